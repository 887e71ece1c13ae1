"""AdaDiff-style dynamic early exit for the DiT (Tang et al., arXiv 2309.17074; code Tangshengku/AdaDiff).

One tiny certainty head per block reads that block's (detached) tokens and the timestep conditioning;
every exit shares the DiT's one final layer. `adadiff_loss` is AdaDiff's training objective and
`DynamicExitDenoiser` exits per image (AdaDiff's own test averages over the whole batch), running the
images still in flight as a smaller batch and counting the FLOPs each image executed, heads included.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.cost import count_flops
from ...backbones.dit import FREQ_SIZE
from ...backbones.unet import timestep_embedding


class CertaintyHeads(nn.Module):
    """One head per DiT block: certainty u_i in (0, 1) per image from block i's tokens and conditioning."""

    def __init__(self, hidden: int, blocks: int):
        super().__init__()
        # Timestep-aware (the paper's UEM; their U-ViT code only sees it through the time token) as the
        # cheapest form: the token logit w.h plus a per-image offset v.c from the same SiLU'd conditioning
        # the adaLN layers use. Difficulty varies mostly with t, so a t-dependent offset is what shifts
        # the exit point; modulating tokens by c (as adaLN) would cost a D x 2D projection per head.
        self.tokens = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(blocks))
        self.cond = nn.ModuleList(nn.Linear(hidden, 1, bias=False) for _ in range(blocks))
        for layer in [*self.tokens, *self.cond]:  # as AdaDiff: small weights, zero bias, so u starts at 0.5
            nn.init.normal_(layer.weight, std=0.02)
        for layer in self.tokens:
            nn.init.zeros_(layer.bias)

    def forward(self, i: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Return the certainty (B,) of head i for tokens h (B, T, D) and conditioning c (B or 1, D)."""
        # detached, as AdaDiff: the heads learn to read the backbone's features, never to change them
        logits = self.tokens[i](h.detach()) + self.cond[i](c.detach()).unsqueeze(1)  # (B, T, 1)
        # AdaDiff predicts a certainty per pixel; we keep one per token and average it over the image,
        # since the exit decision (and our pseudo-label) is one number per image
        return torch.sigmoid(logits).squeeze(-1).mean(dim=1)


def _stem(dit, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Return tokens (B, T, D) and SiLU'd conditioning c, exactly as DiT.forward computes them."""
    t = torch.as_tensor(t, device=x.device)
    c = F.silu(dit.time_embed(timestep_embedding(t, FREQ_SIZE).to(x.dtype)))
    return dit.patch_embed(x).flatten(2).transpose(1, 2) + dit.pos_embed.to(x.dtype), c


def _exit(dit, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return eps (B, C, H, W) from the shared final layer applied to tokens h."""
    return dit.unpatchify(dit.final_layer(h, c))


def exit_outputs(dit, heads: CertaintyHeads, x: torch.Tensor, t) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return eps_i (B, C, H, W) and certainty u_i (B,) after each of the DiT's active blocks."""
    h, c = _stem(dit, x, t)
    eps, certainty = [], []
    for i, block in enumerate(dit.blocks[: dit.depth]):
        h = block(h, c)
        eps.append(_exit(dit, h, c))
        certainty.append(heads(i, h, c))
    return eps, certainty


def pseudo_labels(eps_list: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """Return the detached certainty targets (B, L): per image, the mean of 1 - tanh(|eps_i - noise|)."""
    with torch.no_grad():  # a target: no gradient may reach the exits through it
        return torch.stack([(1 - torch.tanh((e - noise).abs())).flatten(1).mean(1) for e in eps_list], 1)


def adadiff_loss(eps_list: list[torch.Tensor], u_list: list[torch.Tensor], noise: torch.Tensor
                 ) -> tuple[torch.Tensor, dict]:
    """Return AdaDiff's loss (final MSE + certainty MSE + certainty-weighted layer MSE) and its parts."""
    # After Tangshengku/AdaDiff sde.py: LSimple = mos(noise - pred) + mos_lte + mos_layer_wise.
    # The pseudo-label compares each exit with the TRUE noise (`1 - tanh(|pred - noise|)`, detached), not
    # with the final layer's eps. Ours is one number per image (pixels averaged); theirs is per pixel.
    mse = torch.stack([(e - noise).pow(2).flatten(1).mean(1) for e in eps_list], 1)  # (B, L)
    u, u_hat = torch.stack(list(u_list), 1), pseudo_labels(eps_list, noise)  # (B, L) each
    final = mse[:, -1].mean()
    # mos_lte: the certainty MSE is averaged over the layers (their 1/len(preds)), not summed
    head = (u - u_hat).pow(2).mean()
    # mos_layer_wise: w_i = u_i / sum_j u_j, so confident exits are pushed hardest toward the noise, the
    # last layer included (so the final MSE counts twice, as theirs). Departures: their u is a batch mean
    # (`.mean()` over all images) and not detached; ours is per image and detached, so the heads learn
    # only to predict the pseudo-label and the exit threshold keeps its meaning.
    w = (u / u.sum(1, keepdim=True)).detach()
    layer = (w * mse).sum(1).mean()
    total = final + head + layer
    parts = {"final": final, "certainty": head, "layerwise": layer, "total": total}
    return total, {k: float(v.detach()) for k, v in parts.items()}


class DynamicExitDenoiser:
    """A denoiser (x, t) -> eps that stops each image at the first block whose certainty >= threshold."""

    def __init__(self, dit, heads: CertaintyHeads, threshold: float, exits=None):
        """`exits`: the depths an image may leave at (default: after every block). A supernet's exits
        are its depth choices, the only depths the sandwich rule trained the final layer after."""
        self.dit, self.heads, self.threshold = dit, heads, float(threshold)
        self.exits = sorted(set(exits)) if exits is not None else list(range(1, dit.depth + 1))
        self.last_depths: torch.Tensor | None = None
        self.last_flops: torch.Tensor | None = None
        self._log: list[tuple[torch.Tensor, torch.Tensor]] = []  # (depths, FLOPs) of every call since drain()
        self._costs_for, self._costs = None, None
        self.unit_flops  # measure now, before anyone wraps the modules

    @property
    def unit_flops(self) -> dict[str, int]:
        """Return FLOPs per image of the stem, one block, one head and the final layer, for the active subnet."""
        key = (getattr(self.dit, "subnet", None), self.dit.depth)
        if self._costs is None or self._costs_for != key:
            self._costs_for, self._costs = key, self._measure()
        return self._costs

    def _measure(self) -> dict[str, int]:
        # on meta copies: no compute, and meta counts attention (the CPU fused kernel is not registered
        # with the flop counter); all blocks of one subnet have one width, so block 0 stands for each
        dit, heads = copy.deepcopy(self.dit).to("meta"), copy.deepcopy(self.heads).to("meta")
        x, t = torch.empty(1, *dit.image_shape, device="meta"), torch.zeros(1, device="meta")
        h, c = _stem(dit, x, t)
        return {"stem": count_flops(lambda a, b: _stem(dit, a, b), x, t),
                "block": count_flops(dit.blocks[0], h, c),
                "head": count_flops(lambda a, b: heads(0, a, b), h, c),
                "final": count_flops(lambda a, b: _exit(dit, a, b), h, c)}

    def flops_at(self, depths: torch.Tensor) -> torch.Tensor:
        """Return executed FLOPs per image (float64, CPU) of images that exited after `depths` blocks."""
        cost, d = self.unit_flops, depths.double().cpu()
        # a head runs at every exit an image reaches except after the last block, which exits unconditionally
        points = torch.tensor([e for e in self.exits if e < self.dit.depth], dtype=torch.float64)
        heads_run = (points[None, :] <= d[:, None]).sum(1).double()
        return cost["stem"] + d * cost["block"] + heads_run * cost["head"] + cost["final"]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """Return eps for x (B, C, H, W) at t, each image exiting at its own depth; record depths and FLOPs."""
        dit, batch = self.dit, x.shape[0]
        h, c = _stem(dit, x, t)
        out = torch.empty(batch, *dit.image_shape, device=x.device, dtype=x.dtype)
        depths = torch.full((batch,), dit.depth, dtype=torch.long, device=x.device)
        rows = torch.arange(batch, device=x.device)  # the original index of each image still running
        blocks = dit.blocks[: dit.depth]
        for i, block in enumerate(blocks):
            h = block(h, c)
            if i == len(blocks) - 1:  # the last block always exits: its head need not run
                out[rows] = _exit(dit, h, c)
                break
            if i + 1 not in self.exits:
                continue
            done = self.heads(i, h, c) >= self.threshold  # per image, not a batch mean as AdaDiff
            if done.all():
                out[rows], depths[rows] = _exit(dit, h, c), i + 1
                break
            if done.any():
                go, stay = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
                out[rows[go]] = _exit(dit, h[go], c[go] if c.shape[0] > 1 else c)
                depths[rows[go]] = i + 1
                # the rest go on as a smaller batch: that is where the saving is
                rows, h = rows[stay], h[stay]
                c = c[stay] if c.shape[0] > 1 else c
        self.last_depths, self.last_flops = depths, self.flops_at(depths)
        self._log.append((depths.cpu(), self.last_flops))
        return out

    def drain(self) -> tuple[torch.Tensor, dict]:
        """Return the executed FLOPs per image of every call since the last drain, in call order (a
        sampling step split into chunks gives its images in order), with {"depth": blocks run per
        image}, and forget them (space.steps.ExecutedRecord keeps them per step)."""
        log, self._log = self._log, []
        if not log:
            return torch.zeros(0, dtype=torch.float64), {"depth": torch.zeros(0, dtype=torch.long)}
        return torch.cat([f for _, f in log]), {"depth": torch.cat([d for d, _ in log])}
