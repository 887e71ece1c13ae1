"""The fused CPU inference kernel of the residual blocks (conv3x3.c), built on first use.

`conv3x3(conv, x, x2, norm=..., mod=..., res=... | skip=...)` computes

    conv(silu(norm(cat(x, x2)) * (1 + scale) + shift)) + (res | skip(cat(s1, s2)))

in one pass per image; see conv3x3.c for why it is written by hand. The C file is compiled with the
system C compiler into a per-user cache the first time it is needed (well under a second), as
torch.utils.cpp_extension does for C++ but without torch's headers or ninja: the kernel only needs
pointers, so it is loaded with ctypes. Where it cannot run (no x86-64 AVX2/FMA, no compiler, not
float32 CPU tensors, a channel count that is not a multiple of 8) `available()`/`supports()` say so
and the callers keep torch's own path. `DDSM_SEARCH_KERNELS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).parent
_SOURCES = ("conv3x3.c", "conv3x3_tiles.h")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


class _Args(ctypes.Structure):
    """conv_args in conv3x3.c, field for field."""

    _P, _I = ctypes.c_void_p, ctypes.c_int
    _fields_ = [("n", _I), ("h", _I), ("w", _I), ("x1", _P), ("x2", _P), ("c1", _I), ("c2", _I), ("upsample", _I),
                ("stride", _I), ("weight", _P), ("bias", _P), ("k", _I), ("groups", _I), ("gamma", _P), ("beta", _P),
                ("eps", ctypes.c_float), ("scale", _P), ("shift", _P), ("mod_stride", _I), ("res", _P),
                ("s1", _P), ("s2", _P), ("sc1", _I), ("sc2", _I), ("skip_weight", _P), ("skip_bias", _P), ("y", _P)]


def cache_dir() -> Path:
    """Return where built kernels are kept: $DDSM_SEARCH_CACHE, else $XDG_CACHE_HOME/ddsm-search, else ~/.cache."""
    if os.environ.get("DDSM_SEARCH_CACHE"):
        return Path(os.environ["DDSM_SEARCH_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddsm-search" / "kernels"


def _cpu_ok() -> str:
    """Return why this CPU cannot run the kernel, or '' if it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {sys.platform} {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 and FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return ""


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (if not already built from these exact sources) and return the library's path."""
    digest = hashlib.sha256(b"".join((_HERE / s).read_bytes() for s in _SOURCES) + " ".join(_FLAGS).encode())
    target = (out_dir or cache_dir()) / digest.hexdigest()[:16] / "libddsm_conv3x3.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: atomic
        built = Path(tmp) / target.name
        proc = subprocess.run([cc, *_FLAGS, str(_HERE / "conv3x3.c"), "-o", str(built)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        os.replace(built, target)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("DDSM_SEARCH_KERNELS", "1") == "0":
        _reason = "turned off by DDSM_SEARCH_KERNELS=0"
        return None
    _reason = _cpu_ok()
    if _reason:
        return None
    try:
        # torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime torch
        # already loaded (PyPI's torch wheels ship libgomp.so.1): one thread pool, and
        # torch.set_num_threads governs both
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as exc:
        _reason = f"could not build the fused kernel: {exc}"
        warnings.warn(f"ddsm-search: {_reason}; using torch's layers (slower on CPU)", RuntimeWarning, stacklevel=3)
        return None
    lib.ddsm_conv3x3.argtypes = [ctypes.POINTER(_Args)]
    lib.ddsm_conv3x3.restype = ctypes.c_int
    _lib = lib
    return _lib


def available() -> bool:
    """Return whether the fused kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def why_unavailable() -> str:
    """Return why the kernel is not available ('' if it is)."""
    _load()
    return _reason


def reset() -> None:
    """Forget the loaded kernel, so the next call looks again (after changing DDSM_SEARCH_KERNELS or CC)."""
    global _lib, _tried, _reason
    _lib, _tried, _reason = None, False, ""


@contextlib.contextmanager
def disabled():
    """Within this block the callers use torch's layers, as where the kernel is not available."""
    global _lib, _tried, _reason
    _load()
    saved = _lib, _tried, _reason
    _lib, _tried, _reason = None, True, "disabled by kernels.disabled()"
    try:
        yield
    finally:
        _lib, _tried, _reason = saved


def out_channels(conv: torch.nn.Module) -> int:
    """Return the output channels of a convolution (slimmable: at its current width)."""
    return sum(conv.active_out()) if hasattr(conv, "active_out") else conv.out_channels


def supports(x: torch.Tensor, *convs: torch.nn.Module) -> bool:
    """Return whether input `x` (N, C, H, W) and these 3x3 convolutions (stride 1, or 2 on an even size)
    can take the fused path: an inference-time float32 CPU tensor, output channels a multiple of 8,
    and the kernel available."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and all(c.kernel_size == (3, 3) and c.padding == (1, 1) and out_channels(c) % 8 == 0
                    and (c.stride == (1, 1) or c.stride == (2, 2) and x.shape[2] % 2 == 0 == x.shape[3] % 2)
                    for c in convs)
            and available())


def _cached(module: torch.nn.Module, make):
    """Return make(module), cached on the module until its weight changes (the version counter moves
    or the storage does) or, for a slimmable layer, its width does. Weights created under
    torch.inference_mode() have no version counter; in-place changes to those are not seen."""
    weight = module.weight
    key = (-1 if weight.is_inference() else weight._version, weight.data_ptr(), getattr(module, "width", None))
    cache = module.__dict__.setdefault("_ddsm_fused", {})
    if key not in cache:
        if len(cache) >= 8:  # stale widths or old weights
            cache.clear()
        cache[key] = make(module)
    return cache[key]


def _pack_conv(conv: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight as (kh, kw, C, K) contiguous, bias) of a convolution at its current width."""
    weight = conv.sliced_weight() if hasattr(conv, "sliced_weight") else conv.weight
    bias = conv.sliced_bias() if hasattr(conv, "sliced_bias") else conv.bias
    bias = bias.detach().contiguous() if bias is not None else torch.zeros(weight.shape[0])
    return weight.detach().permute(2, 3, 1, 0).contiguous(), bias


def _pack_norm(norm: torch.nn.Module) -> tuple[int | None, torch.Tensor, torch.Tensor, float]:
    """(groups or None for channels // group_size, gamma, beta, eps) of a GroupNorm at its current width."""
    if hasattr(norm, "group_size"):  # SlimGroupNorm: channels per group fixed
        return None, norm.sliced_weight().detach().contiguous(), norm.sliced_bias().detach().contiguous(), float(norm.eps)
    return norm.num_groups, norm.weight.detach().contiguous(), norm.bias.detach().contiguous(), float(norm.eps)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def conv3x3(conv: torch.nn.Module, x: torch.Tensor, x2: torch.Tensor | None = None, *, upsample: bool = False,
            norm: torch.nn.Module | None = None, mod: torch.Tensor | None = None, res: torch.Tensor | None = None,
            skip: torch.nn.Module | None = None, skip_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
            ) -> torch.Tensor:
    """Return the fused convolution (see the module docstring) of input cat(x, x2), 2x upsampled first if asked.

    `conv` is a 3x3, padding-1 convolution (stride 1, or 2 without upsample or skip) and `norm` a
    GroupNorm (each slimmable or plain);
    `mod` is [scale, shift] as (N or 1, 2C); `res` (N, K, H, W) is added, or else `skip`, a 1x1
    convolution, applied to cat(*skip_in). The caller checks `supports(x, conv)` first.
    """
    weight, bias = _cached(conv, _pack_conv)
    n, c1, h, w = x.shape
    c2 = 0 if x2 is None else x2.shape[1]
    c, k = c1 + c2, weight.shape[3]
    if weight.shape[2] != c:
        raise ValueError(f"the convolution takes {weight.shape[2]} channels, the input has {c}")
    x, x2 = _nhwc(x), None if x2 is None else _nhwc(x2)
    stride = conv.stride[0]
    if upsample:
        h, w = 2 * h, 2 * w
    h, w = h // stride, w // stride
    out = torch.empty((n, k, h, w), memory_format=torch.channels_last)
    # the kernel reads every tensor by address: each is held by a local variable until it returns
    args = _Args(n=n, h=h, w=w, x1=x.data_ptr(), x2=_ptr(x2), c1=c1, c2=c2, upsample=int(upsample), stride=stride,
                 weight=weight.data_ptr(), bias=bias.data_ptr(), k=k, y=out.data_ptr())
    if norm is not None:
        groups, gamma, beta, eps = _cached(norm, _pack_norm)
        args.groups, args.gamma, args.beta, args.eps = groups or c // norm.group_size, gamma.data_ptr(), beta.data_ptr(), eps
        if args.groups <= 0 or c % args.groups:
            raise ValueError(f"{args.groups} groups do not divide {c} channels")
    if mod is not None:
        mod = mod.float().contiguous()
        if mod.shape[1] != 2 * c or mod.shape[0] not in (1, n):
            raise ValueError(f"scale/shift of shape {tuple(mod.shape)} do not fit {n} images of {c} channels")
        args.scale, args.shift, args.mod_stride = mod.data_ptr(), mod.data_ptr() + 4 * c, 2 * c if mod.shape[0] == n else 0
    if res is not None:
        res = _nhwc(res)
        if tuple(res.shape) != tuple(out.shape):
            raise ValueError(f"the residual has shape {tuple(res.shape)}, the output {tuple(out.shape)}")
        args.res = res.data_ptr()
    if skip is not None:
        s1, s2 = _nhwc(skip_in[0]), None if skip_in[1] is None else _nhwc(skip_in[1])
        skip_weight, skip_bias = _cached(skip, _pack_conv)  # (1, 1, S, K)
        args.s1, args.s2, args.sc1, args.sc2 = s1.data_ptr(), _ptr(s2), s1.shape[1], 0 if s2 is None else s2.shape[1]
        if skip_weight.shape[2] != args.sc1 + args.sc2 or s1.shape[2:] != out.shape[2:]:
            raise ValueError("the skip convolution does not fit its input or the output")
        args.skip_weight, args.skip_bias = skip_weight.data_ptr(), skip_bias.data_ptr()
    if _lib.ddsm_conv3x3(ctypes.byref(args)) != 0:
        raise RuntimeError(f"the fused kernel refused its input ({c} -> {k} channels, {h}x{w}) or ran out of memory")
    return out
