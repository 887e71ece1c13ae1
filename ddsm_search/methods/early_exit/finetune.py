"""The finetune-exit stage: train AdaDiff's certainty heads on a trained DiT supernet, keep them beside
it, and sample with a dynamic (per image) early exit.

Departure from AdaDiff, on purpose: the supernet's weights stay frozen and only the heads train. In
AdaDiff the layer-wise loss teaches the backbone to predict well from early blocks; in a supernet the
sandwich rule over the depth axis has already trained every exit at a depth choice through the one
shared final layer, and leaving the backbone untouched keeps the supernet's hash, its searched
schedules and its static subnets valid. So images may exit only at the supernet's depth choices.
Heads read the full-width residual stream, so one set serves every width; training draws a width per
step so that the heads see every width's tokens.

Files beside the supernet: exit_heads.safetensors (the heads) and exit_heads.json (the supernet's
SHA-256, the heads' SHA-256, the settings and the last losses), written atomically, the JSON last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...checkpoint import Supernet, load_supernet
from ...diffusion import NoiseSchedule
from ...errors import DDSMError
from ...io import read_json, sha256_file, write_atomic, write_json_atomic

HEADS, HEADS_META = "exit_heads.safetensors", "exit_heads.json"
FORMAT = "ddsm-search/exit-heads"


def _require_dit(supernet: Supernet) -> None:
    if supernet.config.model.kind != "dit":
        raise DDSMError(f"early exit needs a DiT supernet (model.kind: dit); {supernet.path} is a "
                        f"{supernet.config.model.kind}")


def finetune_exit(supernet_dir: str | Path, *, steps: int = 500, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, device: str = "cpu", progress: bool = True) -> Path:
    """Train certainty heads on the frozen supernet with AdaDiff's loss; write them beside it; return the JSON path."""
    from ...data import load_data
    from .heads import CertaintyHeads, adadiff_loss

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise DDSMError("finetune-exit: --train-steps and --batch-size must be at least 1 and --lr positive")
    supernet = load_supernet(supernet_dir, device)
    _require_dit(supernet)
    model, cfg = supernet.model, supernet.config
    data = load_data(cfg.data)
    torch.manual_seed(seed)
    heads = CertaintyHeads(cfg.model.hidden_size, cfg.model.blocks).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr)
    schedule, g = NoiseSchedule(cfg.diffusion), torch.Generator().manual_seed(seed)
    widths = model.space.choices("width")
    model.requires_grad_(False)
    bar = tqdm(range(steps), desc="finetune-exit", unit="step", disable=not progress)
    parts = {}
    for _ in bar:
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0 = data.to_float(idx)
        t = torch.randint(schedule.timesteps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        width = widths[int(torch.randint(len(widths), (1,), generator=g))]
        model.set_subnet(model.full.replace(width=width))
        tokens, eps, c = _frozen_pass(model, schedule.q_sample(x0, t, noise).to(device), t.to(device))
        u = [heads(i, h, c) for i, h in enumerate(tokens)]  # the only graph: the heads'
        loss, parts = adadiff_loss(eps, u, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix({"certainty": f"{parts['certainty']:.4f}"})
    model.set_subnet(model.full)
    return save_exit_heads(supernet, heads, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                             "last_losses": parts})


@torch.no_grad()
def _frozen_pass(model, xt: torch.Tensor, t: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Return each block's tokens, each exit's eps (the shared final layer) and the conditioning, without
    autograd: the backbone is frozen."""
    from .heads import _exit, _stem

    h, c = _stem(model, xt, t)
    tokens, eps = [], []
    for block in model.blocks[: model.depth]:
        h = block(h, c)
        tokens.append(h)
        eps.append(_exit(model, h, c))
    return tokens, eps, c


def save_exit_heads(supernet: Supernet, heads, info: dict) -> Path:
    """Write the heads and their JSON (last) beside the supernet; return the JSON path."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()})
    path = Path(supernet.path)
    write_atomic(path / HEADS, lambda tmp: tmp.write_bytes(blob))
    return write_json_atomic(path / HEADS_META, {"format": FORMAT, "version": 1, "supernet_sha256": supernet.sha256,
                                                 "sha256": sha256_file(path / HEADS), **info})


def _checked_heads(supernet: Supernet) -> Path:
    """Return the exit heads' weights file kept beside `supernet`, after checking its metadata and hash."""
    _require_dit(supernet)
    path = Path(supernet.path)
    if not (path / HEADS_META).is_file():
        raise DDSMError(f"{path} has no exit heads; train them with 'ddsm-search finetune-exit {path}'")
    meta = read_json(path / HEADS_META)
    if meta.get("format") != FORMAT:
        raise DDSMError(f"{path / HEADS_META} is not a ddsm-search exit-heads file")
    if meta.get("supernet_sha256") != supernet.sha256:
        raise DDSMError(f"the exit heads in {path} were trained for another supernet; run finetune-exit again")
    if not (path / HEADS).is_file() or sha256_file(path / HEADS) != meta.get("sha256"):
        raise DDSMError(f"{path / HEADS} is missing or does not match its hash in {HEADS_META}")
    return path / HEADS


def load_exit_heads(supernet: Supernet, device: str = "cpu"):
    """Return the certainty heads kept beside `supernet`, after checking both hashes."""
    from safetensors.torch import load_file

    from .heads import CertaintyHeads

    weights = _checked_heads(supernet)
    cfg = supernet.config.model
    heads = CertaintyHeads(cfg.hidden_size, cfg.blocks)
    heads.load_state_dict(load_file(str(weights)))
    return heads.to(device).eval()


def heads_sha256(supernet: Supernet) -> str:
    """Return the SHA-256 of the exit heads kept beside `supernet` (checked), for a schedule to name them."""
    return sha256_file(_checked_heads(supernet))
