"""The slimmable DiT supernet (adaLN-Zero, Peebles & Xie 2023) and its static subnets.

Width slices each block's attention heads (the head dimension is fixed, so heads = active channels //
head_dim) and its MLP channels; the residual stream keeps the full `hidden_size` at every width, as in
DyDiT, so the patch embedding, the time embedder, the modulations and the final layer are never sliced.
Depth runs the first `depth` blocks, then the one final layer that every depth shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DDSMError
from ..space.subnet import Subnet, SubnetSpace
from .base import SlimModel
from .slim import SlimKit, StaticKit
from .unet import timestep_embedding

if TYPE_CHECKING:  # annotations only: a backbone reads its section's fields
    from ..config import DiTConfig

FREQ_SIZE = 256  # sinusoidal timestep features fed to the time embedder, as in DiT


def check_image_shape(cfg: DiTConfig, image_shape: tuple[int, int, int]) -> None:
    """Raise DDSMError unless the patch size divides the image height and width."""
    _, height, width = image_shape
    if height % cfg.patch_size or width % cfg.patch_size:
        raise DDSMError(f"model.patch_size: {cfg.patch_size} does not divide the {height}x{width} images; "
                        f"the image size must be a multiple of the patch size")


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Return (M, dim) sin-cos embeddings of positions pos (M,), sines first, as MAE and DiT."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    args = pos.double()[:, None] * omega[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))  # an odd dim gets one zero feature


def pos_embedding_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Return the fixed (rows*cols, dim) 2-D sin-cos position embedding of a row-major patch grid.

    As DiT's (its meshgrid puts w first), the first half encodes the column, the second the row.
    """
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.reshape(-1)), sincos_1d(dim - dim // 2, r.reshape(-1))], 1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return x (B, T, D) scaled and shifted per image by (B, D) modulation rows: x * (1 + scale) + shift.

    One fused pass (addcmul): these elementwise passes over the full-width residual stream do not
    shrink with width, so each one saved brings a narrow subnet's time closer to its FLOPs."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head self-attention with a fixed head dimension, so heads = active channels // head_dim."""

    def __init__(self, kit, hidden: int, inner: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        # fused [q, k, v], sliced per segment: each keeps its leading heads; the input is the full stream
        self.qkv = kit.linear(hidden, (inner, inner, inner), slim_in=False)
        self.proj = kit.linear(inner, hidden, slim_out=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, heads * self.head_dim))


class Mlp(nn.Module):
    """Linear, GELU (tanh approximation, as DiT), dropout, linear; the hidden channels shrink with width."""

    def __init__(self, kit, hidden: int, mlp: int, dropout: float):
        super().__init__()
        self.fc1 = kit.linear(hidden, mlp, slim_in=False)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = kit.linear(mlp, hidden, slim_out=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: gated, modulated attention then MLP."""

    def __init__(self, kit, hidden: int, inner: int, mlp: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(kit, hidden, inner, head_dim)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(kit, hidden, mlp, dropout)
        # [shift, scale, gate] for attention then MLP: six segments of the residual stream, which stays
        # full width at every subnet, so none is sliced
        self.modulation = kit.linear(hidden, (hidden,) * 6, slim_in=False, slim_out=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Return the block's output for tokens x (B, T, D) and SiLU'd conditioning c (B or 1, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1)))  # x + gate * attn
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map of each token to its patch's pixels; shared by all depths."""

    def __init__(self, kit, hidden: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = kit.linear(hidden, (hidden, hidden), slim_in=False, slim_out=False)  # [shift, scale]
        self.linear = kit.linear(hidden, out, slim_in=False, slim_out=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Return (B, T, out) patch pixels for tokens x (B, T, D) and SiLU'd conditioning c."""
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """A DiT epsilon-predictor; its layers come from `kit` (slimmable, or static at one width).

    It runs its first `depth` blocks (all of them unless given); a static subnet is built with only those.
    """

    def __init__(self, cfg: DiTConfig, image_shape: tuple[int, int, int], kit, depth: int | None = None):
        check_image_shape(cfg, image_shape)
        super().__init__()
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        channels, height, width = self.image_shape
        p, hidden = cfg.patch_size, cfg.hidden_size
        self.grid = (height // p, width // p)
        self.patch_embed = kit.conv(channels, hidden, p, stride=p, slim_in=False, slim_out=False)
        # fixed, not trained, and recomputed at construction: so not saved in the state dict
        self.register_buffer("pos_embed", pos_embedding_2d(hidden, *self.grid)[None], persistent=False)
        self.time_embed = nn.Sequential(kit.linear(FREQ_SIZE, hidden, slim_in=False, slim_out=False), nn.SiLU(),
                                        kit.linear(hidden, hidden, slim_in=False, slim_out=False))
        inner, mlp = hidden, int(round(hidden * cfg.mlp_ratio))
        self.blocks = nn.ModuleList(DiTBlock(kit, hidden, inner, mlp, cfg.head_dim, cfg.dropout)
                                    for _ in range(cfg.blocks if depth is None else depth))
        self.depth = len(self.blocks)
        self.final_layer = FinalLayer(kit, hidden, p * p * channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise as DiT: xavier linears, zero biases, and adaLN-Zero (zero modulations and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # like a linear on the flattened patch, as DiT
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # zero gates: every block starts as the identity, and the output layer predicts zero
        for layer in [b.modulation for b in self.blocks] + [self.final_layer.modulation, self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Return images (B, C, H, W) from per-patch pixels (B, T, p*p*C), patches in row-major order."""
        (channels, _, _), p, (rows, cols) = self.image_shape, self.cfg.patch_size, self.grid
        x = x.reshape(x.shape[0], rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], channels, rows * p, cols * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return predicted noise for images x (B, C, H, W) at timesteps t: (B,) or a scalar for all."""
        return self.deep_forward(x, t)[0]

    # -- block caching (Delta-DiT's Delta-Cache of the back blocks; methods/caching) ----------------
    @property
    def cache_branches(self) -> int:
        """Return the most blocks a cached step may run fresh: depth - 1 (at least one block is cached)."""
        return self.depth - 1

    def deep_forward(self, x: torch.Tensor, t: torch.Tensor, *, branch: int | None = None,
                     feature: torch.Tensor | None = None, record=()) -> tuple[torch.Tensor, dict]:
        """Return (predicted noise, {b: the change blocks b .. depth-1 made to the tokens} for b in `record`).

        With `branch` b and `feature` (that change, recorded at a full step), run only the first b
        blocks and add the recorded change for the others (Delta-DiT's Delta-Cache).
        """
        t = torch.as_tensor(t, device=x.device)
        # every modulation starts with SiLU of the conditioning: computed once here, not once per layer
        c = F.silu(self.time_embed(timestep_embedding(t, FREQ_SIZE).to(x.dtype)))
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        before = {}
        for i, block in enumerate(self.blocks[: self.depth if branch is None else branch]):
            if i in record:
                before[i] = h
            h = block(h, c)
        if branch is not None:
            h = h + feature
        return self.unpatchify(self.final_layer(h, c)), {b: h - before[b] for b in record}


class SlimDiT(DiT, SlimModel):
    """The supernet: one set of weights, a working denoiser at every (width, depth) of its config."""

    def __init__(self, cfg: DiTConfig, image_shape: tuple[int, int, int]):
        super().__init__(cfg, image_shape, SlimKit(1))  # no GroupNorm: the group size is unused
        self.space = SubnetSpace.of(cfg.axes())
        self.subnet = self.space.full
        for w in self.space.choices("width"):  # config validation checks this too; a config built in code may not
            c = self.blocks[0].attn.proj.active_in(w)[0]
            if c % cfg.head_dim:
                raise DDSMError(f"model.widths: width {w!r} gives {c} attention channels, not a whole number of "
                                f"heads of model.head_dim={cfg.head_dim}")

    def cache_branches_at(self, subnet) -> int:
        """Return depth - 1: a cached step runs 1 .. depth - 1 of the subnet's blocks fresh."""
        return self.check_subnet(subnet)["depth"] - 1

    def apply_subnet(self, subnet: Subnet) -> None:
        """Make every slimmable layer run at the subnet's width, and run its number of blocks."""
        self.set_width(subnet["width"])
        self.depth = subnet["depth"]

    def export(self, subnet) -> DiT:
        """Return a plain static DiT (torch layers only, `depth` blocks) equal to the supernet at `subnet`."""
        subnet = self.check_subnet(subnet)
        width, depth = subnet["width"], subnet["depth"]
        static = DiT(self.cfg, self.image_shape, StaticKit(1, width), depth=depth)

        def runs(name: str) -> bool:  # not the blocks the subnet does not run
            parts = name.split(".")
            return parts[0] != "blocks" or int(parts[1]) < depth
        return self.load_into(static, width, runs)
