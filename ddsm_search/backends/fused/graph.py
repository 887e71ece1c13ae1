"""A whole network for the fused kernel: layers that read and write slots, run with one call per forward.

At inference every image goes through a U-Net on its own (GroupNorm and attention are per image), so
fused.c's ddsm_run takes each image through all the layers in turn, with the activations in a
per-thread arena that stays in cache; only the network's input and output are batch-sized tensors.
One call per forward also removes the per-layer Python, allocation and thread start-up costs, which
are fixed per layer and so weigh most on the narrow widths.

    g = Graph()
    x = g.input(channels, h, w)
    h = g.conv(block.conv1, x, norm=block.norm1)            # GroupNorm, SiLU, 3x3 convolution
    ...
    program = g.compile(g.conv(net.conv_out, h, norm=net.norm_out, pad_out=True), channels=1)
    eps = program.run(images, emb)                          # emb feeds every g.mod(linear)

A layer the kernel cannot take raises `Unsupported`; the caller then keeps torch's layers. The program
holds the layers' packed weights: build a new one when they change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from . import _load, _Op, _Slot

_ALIGN = 16  # floats: arena regions start on a cache line
# Widest 3x3 layer the kernel takes. Measured on the 2-core AMD EPYC (AVX2) against torch's layers
# (oneDNN), whole U-Nets at inference: with 3x3 layers of at most 64 output channels the kernel was
# 1.2-2.1x faster (digits; base 32 at 16x16 and 32x32; base 64 at width 0.5) and 1.35x for CIFAR-10's
# U-Net at width 0.25 without attention (level with torch with it); with 128 or more it was 1.03-1.6x
# slower (base 64 at full width, CIFAR-10 at 0.5 and 1.0): oneDNN's cache blocking wins there. Such
# networks keep torch's layers.
MAX_CONV_CHANNELS = 64


def out_channels(conv: torch.nn.Module) -> int:
    """Return the output channels of a convolution (slimmable: at its current width)."""
    return sum(conv.active_out()) if hasattr(conv, "active_out") else conv.out_channels


def _weight_bias(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a layer at its current width (a slimmable layer's slices), detached; a
    missing bias as zeros."""
    weight = module.sliced_weight() if hasattr(module, "sliced_weight") else module.weight
    bias = module.sliced_bias() if hasattr(module, "sliced_bias") else module.bias
    return weight.detach(), bias.detach().contiguous() if bias is not None else torch.zeros(weight.shape[0])


def _pack_conv(conv: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight as (kh, kw, C, K) contiguous, bias) of a convolution at its current width."""
    weight, bias = _weight_bias(conv)
    return weight.permute(2, 3, 1, 0).contiguous(), bias


def _pack_norm(norm: torch.nn.Module) -> tuple[int | None, torch.Tensor, torch.Tensor, float]:
    """(groups or None for channels // group_size, gamma, beta, eps) of a GroupNorm at its current width."""
    gamma, beta = _weight_bias(norm)
    groups = None if hasattr(norm, "group_size") else norm.num_groups  # SlimGroupNorm: channels per group fixed
    return groups, gamma.contiguous(), beta, float(norm.eps)


class Unsupported(Exception):
    """A layer or shape the fused kernel cannot run."""


class Slot:
    """A value in the graph: `channels` x `h` x `w` floats per image (channels innermost)."""

    __slots__ = ("index", "channels", "h", "w")

    def __init__(self, index: int, channels: int, h: int, w: int):
        self.index, self.channels, self.h, self.w = index, channels, h, w

    @property
    def size(self) -> int:
        return self.channels * self.h * self.w


class Graph:
    """Builds the list of layers; `compile` lays out the arena and returns a runnable `Program`."""

    def __init__(self):
        self.slots: list[Slot] = []
        self.ops: list[dict] = []
        self.mods: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, bias) of each scale/shift linear
        self.keep: list[torch.Tensor] = []  # what the ops point into
        self.inputs: list[Slot] = []

    def _slot(self, channels: int, h: int, w: int) -> Slot:
        slot = Slot(len(self.slots), channels, h, w)
        self.slots.append(slot)
        return slot

    def input(self, channels: int, h: int, w: int) -> Slot:
        """Declare an input of the network: (N, channels, h, w) tensors, given to `Program.run` in order."""
        self.inputs.append(self._slot(channels, h, w))
        return self.inputs[-1]

    def mod(self, linear: torch.nn.Module) -> int:
        """Register a linear layer that maps the time embedding to [scale, shift]; return its index."""
        self.mods.append(_weight_bias(linear))
        return len(self.mods) - 1

    def conv(self, conv: torch.nn.Module, x: Slot, x2: Slot | None = None, *, norm: torch.nn.Module | None = None,
             act: bool = True, mod: int | None = None, res: Slot | None = None, skip: torch.nn.Module | None = None,
             skip_in: tuple[Slot, Slot | None] | None = None, upsample: bool = False, pad_out: bool = False) -> Slot:
        """Add `conv(act(norm(cat(x, x2)) * (1 + scale) + shift)) + (res | skip(cat(*skip_in)))`, as
        fused.c's conv_args; `conv` is 3x3 (padding 1, stride 1 or 2) or 1x1 (stride 1); `act` is SiLU;
        `mod` an index from `mod()`. With `pad_out` an output channel count that is not a multiple
        of 8 is padded with zero channels (for the last layer: `compile` trims them); fewer than 8
        (an image's channels) are computed as dot products and written unpadded."""
        one = conv.kernel_size == (1, 1)
        if not (conv.kernel_size == (3, 3) and conv.padding == (1, 1) or one and conv.padding == (0, 0)):
            raise Unsupported(f"a {conv.kernel_size} convolution with padding {conv.padding}")
        stride = conv.stride[0]
        if conv.stride not in ((1, 1), (2, 2)) or stride == 2 and (one or upsample or skip is not None):
            raise Unsupported(f"stride {conv.stride}")
        if x2 is not None and (x2.h, x2.w) != (x.h, x.w):
            raise Unsupported("concatenated inputs of different sizes")
        h, w = (2 * x.h, 2 * x.w) if upsample else (x.h, x.w)
        if h % stride or w % stride:
            raise Unsupported(f"stride {stride} on a {h}x{w} input")
        h, w = h // stride, w // stride
        weight, bias = _pack_conv(conv)
        c1, c2 = x.channels, 0 if x2 is None else x2.channels
        k = out_channels(conv)
        if weight.shape[2] != c1 + c2:
            raise Unsupported(f"the convolution takes {weight.shape[2]} channels, its input has {c1 + c2}")
        if not one and k > MAX_CONV_CHANNELS:
            raise Unsupported(f"a 3x3 layer of {k} output channels (torch's layers are faster beyond {MAX_CONV_CHANNELS})")
        if k % 8:
            if not pad_out:
                raise Unsupported(f"{k} output channels (not a multiple of 8)")
            if k < 8 and res is None and skip is None:  # dot products per output channel: (k, kh, kw, C)
                weight = weight.permute(3, 0, 1, 2).contiguous()
            else:
                kp = -(-k // 8) * 8
                weight = torch.cat([weight, weight.new_zeros(*weight.shape[:3], kp - k)], dim=3).contiguous()
                bias, k = torch.cat([bias, bias.new_zeros(kp - k)]), kp
        op = {"kind": 0, "x1": x.index, "x2": -1 if x2 is None else x2.index, "res": -1, "s1": -1, "s2": -1}
        a = dict(h=h, w=w, c1=c1, c2=c2, upsample=int(upsample), stride=stride, weight=weight.data_ptr(),
                 bias=bias.data_ptr(), k=k, kernel1x1=int(one), no_act=int(not act))
        self.keep += [weight, bias]
        if norm is not None:
            groups, gamma, beta, eps = _pack_norm(norm)
            groups = groups or (c1 + c2) // norm.group_size
            if groups <= 0 or (c1 + c2) % groups or gamma.numel() != c1 + c2:
                raise Unsupported(f"a GroupNorm of {groups} groups over {c1 + c2} channels")
            a.update(groups=groups, gamma=gamma.data_ptr(), beta=beta.data_ptr(), eps=eps)
            self.keep += [gamma, beta]
        if mod is not None:
            if norm is None or self.mods[mod][0].shape[0] != 2 * (c1 + c2):
                raise Unsupported("a scale/shift that does not fit the normalised input")
            op["mod"] = mod
        out = self._slot(k, h, w)
        if res is not None:
            if (res.channels, res.h, res.w) != (k, h, w):
                raise Unsupported("a residual of another shape than the output")
            op["res"] = res.index
        if skip is not None:
            s1, s2 = skip_in
            skip_weight, skip_bias = _pack_conv(skip)
            sc1, sc2 = s1.channels, 0 if s2 is None else s2.channels
            if skip_weight.shape[:3] != (1, 1, sc1 + sc2) or skip_weight.shape[3] != k or (s1.h, s1.w) != (h, w):
                raise Unsupported("a skip convolution that does not fit its input or the output")
            op.update(s1=s1.index, s2=-1 if s2 is None else s2.index)
            a.update(sc1=sc1, sc2=sc2, skip_weight=skip_weight.data_ptr(), skip_bias=skip_bias.data_ptr())
            self.keep += [skip_weight, skip_bias]
        op.update(a=a, y=out.index)
        self.ops.append(op)
        return out

    def attention(self, qkv: Slot, head_dim: int) -> Slot:
        """Add multi-head self-attention over the pixels of `qkv`, whose channels are [q | k | v], each
        split into heads of `head_dim` (as F.scaled_dot_product_attention after the U-Net's reshape)."""
        if qkv.channels % 3 or (qkv.channels // 3) % head_dim:
            raise Unsupported(f"attention over {qkv.channels} qkv channels with heads of {head_dim}")
        c = qkv.channels // 3
        out = self._slot(c, qkv.h, qkv.w)
        self.ops.append({"kind": 1, "a": dict(h=qkv.h, w=qkv.w), "heads": c // head_dim, "head_dim": head_dim,
                         "x1": qkv.index, "x2": -1, "res": -1, "s1": -1, "s2": -1, "y": out.index})
        return out

    def compile(self, output: Slot, channels: int | None = None) -> Program:
        """Return the program that computes `output` (its first `channels` channels) from the input."""
        if not self.inputs or not self.ops or self.ops[-1]["y"] != output.index:
            raise ValueError("the output must be the last layer's, and the graph needs an input")
        return Program(self, output, channels or output.channels)


def _layout(graph: Graph, output: Slot) -> tuple[dict[int, int], int]:
    """Return arena offsets (in floats, per image) of the internal slots and the arena's length.

    A slot's region is freed after the last layer that reads it and reused by a later one (first fit);
    a layer's output never shares a region with its inputs. Written by hand: a few lines, and no
    library lays out buffers for ctypes."""
    last = {}
    for i, op in enumerate(graph.ops):
        for key in ("x1", "x2", "res", "s1", "s2"):
            last[op[key]] = i
    offsets, free, end = {}, [], 0  # free: sorted (offset, length) holes
    external = {s.index for s in graph.inputs} | {output.index}
    for i, op in enumerate(graph.ops):
        if op["y"] not in external:
            need = -(-graph.slots[op["y"]].size // _ALIGN) * _ALIGN
            for j, (off, length) in enumerate(free):
                if length >= need:
                    offsets[op["y"]] = off
                    free[j:j + 1] = [(off + need, length - need)] if length > need else []
                    break
            else:
                offsets[op["y"]], end = end, end + need
        for s in {op[key] for key in ("x1", "x2", "res", "s1", "s2", "y")}:
            if s in offsets and last.get(s, i) == i:  # read for the last time (or never read)
                free.append((offsets[s], -(-graph.slots[s].size // _ALIGN) * _ALIGN))
        free = _merge(free)
    return offsets, end


def _merge(free: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the holes sorted, with adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(free):
        if out and out[-1][0] + out[-1][1] >= off:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], off + length) - out[-1][0])
        else:
            out.append((off, length))
    return out


class Program:
    """A compiled graph: `run(x, emb)` computes the network on a batch with one call into the kernel."""

    def __init__(self, graph: Graph, output: Slot, channels: int):
        self._lib = _load()
        if self._lib is None:
            raise Unsupported("the fused kernel is not available")
        self.inputs, self.output, self.channels = list(graph.inputs), output, channels
        self._keep = list(graph.keep)
        offsets, self.arena = _layout(graph, output)
        self._slots = (_Slot * len(graph.slots))()  # the inputs' and the output's pointers are set per call
        for slot in graph.slots:
            self._slots[slot.index].len = slot.size
            self._slots[slot.index].off = offsets.get(slot.index, 0)
        self._ops = (_Op * len(graph.ops))()
        self._mod_ops = []  # (op, offset of its scale in the stacked scale/shift, channels)
        offsets_mod, total = [], 0
        for weight, _ in graph.mods:
            offsets_mod.append(total)
            total += weight.shape[0]
        for i, spec in enumerate(graph.ops):
            op = self._ops[i]
            op.kind = spec["kind"]
            for key, value in spec["a"].items():
                setattr(op.a, key, value)
            op.heads, op.head_dim = spec.get("heads", 0), spec.get("head_dim", 0)
            for key in ("x1", "x2", "res", "s1", "s2", "y"):
                setattr(op, key, spec[key])
            if "mod" in spec:
                self._mod_ops.append((op, offsets_mod[spec["mod"]], spec["a"]["c1"] + spec["a"]["c2"]))
        if graph.mods:
            self._mod_weight = torch.cat([w for w, _ in graph.mods]).contiguous()
            self._mod_bias = torch.cat([b for _, b in graph.mods]).contiguous()
        else:
            self._mod_weight = None
        self._lock = threading.Lock()  # the ops' scale/shift pointers are set per call
        self._mods: dict[Hashable, torch.Tensor] = {}  # scale/shift rows per emb_key

    def run(self, x: torch.Tensor | Sequence[torch.Tensor], emb: torch.Tensor | Callable[[], torch.Tensor] | None = None,
            emb_key: Hashable | None = None) -> torch.Tensor:
        """Return the output (N, channels, h, w) for the input x (N, C, H, W), or the inputs in the
        order they were declared; `emb` (1 or N, E), or a function that returns it, feeds the
        scale/shift layers. With `emb_key` (a timestep, say) their rows are kept for the next call
        with the same key, and `emb` is not called again: every sampling run repeats its timesteps."""
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        n = xs[0].shape[0]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the program takes {len(self.inputs)} inputs, not {len(xs)}")
        for i, (t, slot) in enumerate(zip(xs, self.inputs)):
            if tuple(t.shape) != (n, slot.channels, slot.h, slot.w) or t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError(f"input {i} must be a float32 CPU tensor of shape ({n}, {slot.channels}, {slot.h}, "
                                 f"{slot.w}), not {tuple(t.shape)} {t.dtype} on {t.device}")
        xs = [t.contiguous(memory_format=torch.channels_last) for t in xs]
        mods = self._mods.get(emb_key) if emb_key is not None else None
        if mods is None and self._mod_weight is not None:
            emb = emb() if callable(emb) else emb
            if emb is None or emb.dim() != 2 or emb.shape[0] not in (1, n):
                raise ValueError(f"the time embedding must be (1 or {n}, E)")
            mods = F.linear(emb.float(), self._mod_weight, self._mod_bias).contiguous()
            if emb_key is not None and mods.shape[0] == 1:
                if len(self._mods) >= 1024:
                    self._mods.clear()
                self._mods[emb_key] = mods
        out = torch.empty((n, self.output.channels, self.output.h, self.output.w), memory_format=torch.channels_last)
        with self._lock:
            if mods is not None:
                base, stride = mods.data_ptr(), mods.shape[1] if mods.shape[0] == n else 0
                for op, offset, c in self._mod_ops:
                    op.a.scale, op.a.shift, op.a.mod_stride = base + 4 * offset, base + 4 * (offset + c), stride
            for t, slot in zip(xs, self.inputs):
                self._slots[slot.index].ptr = t.data_ptr()
            self._slots[self.output.index].ptr = out.data_ptr()
            rc = self._lib.ddsm_run(self._ops, len(self._ops), self._slots, len(self._slots), n, self.arena)
            for slot in (*self.inputs, self.output):
                self._slots[slot.index].ptr = None
        if rc != 0:
            raise RuntimeError("the fused kernel refused the network or ran out of memory")
        return out if self.channels == self.output.channels else out[:, :self.channels].contiguous()
