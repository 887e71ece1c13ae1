"""The fused CPU inference kernel (fused.c), built on first use, and its bindings.

fused.c runs a whole network given as a list of layers (see graph.py, which builds the list from
modules): each convolution layer computes

    conv(act(norm(cat(x, x2)) * (1 + scale) + shift)) + (res | skip(cat(s1, s2)))

in one pass per image, and attention layers run per image too; see fused.c for why it is written by
hand. The C file is compiled with the system C compiler into a per-user cache the first time it is
needed (well under a second), as torch.utils.cpp_extension does for C++ but without torch's headers
or ninja: the kernel only needs pointers, so it is loaded with ctypes. Where it cannot run (no x86-64
AVX2/FMA, no compiler) `available()` says so and the callers keep torch's own layers.
`DDSM_SEARCH_KERNELS=0` turns it off.
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
_SOURCES = ("fused.c", "conv3x3_tiles.h")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


class _Args(ctypes.Structure):
    """conv_args in fused.c, field for field: one convolution layer."""

    _P, _I = ctypes.c_void_p, ctypes.c_int
    _fields_ = [("h", _I), ("w", _I), ("c1", _I), ("c2", _I), ("upsample", _I), ("stride", _I), ("weight", _P),
                ("bias", _P), ("k", _I), ("groups", _I), ("gamma", _P), ("beta", _P), ("eps", ctypes.c_float),
                ("scale", _P), ("shift", _P), ("mod_stride", _I), ("sc1", _I), ("sc2", _I), ("skip_weight", _P),
                ("skip_bias", _P), ("kernel1x1", _I), ("no_act", _I)]


class _Op(ctypes.Structure):
    """op_t in fused.c: one layer of a network for ddsm_run."""

    _I = ctypes.c_int
    _fields_ = [("kind", _I), ("a", _Args), ("heads", _I), ("head_dim", _I),
                ("x1", _I), ("x2", _I), ("res", _I), ("s1", _I), ("s2", _I), ("y", _I)]


class _Slot(ctypes.Structure):
    """slot_t in fused.c: an external (N, len) tensor, or a region of the per-thread arena."""

    _fields_ = [("ptr", ctypes.c_void_p), ("off", ctypes.c_long), ("len", ctypes.c_long)]


def cache_dir() -> Path:
    """Return where built kernels are kept: the package's cache folder (io.cache_dir) / kernels."""
    from ...io import cache_dir as root

    return root() / "kernels"


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
    target = (out_dir or cache_dir()) / digest.hexdigest()[:16] / "libddsm_fused.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: atomic
        built = Path(tmp) / target.name
        proc = subprocess.run([cc, *_FLAGS, str(_HERE / "fused.c"), "-o", str(built)],
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
    lib.ddsm_run.argtypes = [ctypes.POINTER(_Op), ctypes.c_int, ctypes.POINTER(_Slot), ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
    lib.ddsm_run.restype = ctypes.c_int
    _lib = lib
    return _lib


def available() -> bool:
    """Return whether the fused kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def why_unavailable() -> str:
    """Return why the kernel is not available ('' if it is)."""
    _load()
    return _reason


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
