"""The finetune stage: Step-Adaptive Training's per-group fine-tuning (reconstructed) of a chosen
schedule, each group's subnet on its own timesteps only.

A group is a maximal run of consecutive sampling steps that run the same subnet (the schedule's own
segments); with `snr_groups=K` a run is also cut where its steps' timesteps cross from one of the K
SNR groups of `step_groups.snr_groups` into another, so that a prior schedule gets exactly one group
per SNR group it reaches, as in the paper. Group [a, b) of a schedule with timesteps t_0 > ... > t_{N-1}
trains on the timesteps t_b + 1 .. t_a (0 .. t_a for the last group, t_0 = T-1 for the first): the
groups tile 0 .. T-1, and each holds exactly the timesteps its steps run at plus those down to the
next group's.

Each group gets its own copy of its subnet's exported static network, starting from the supernet's
weights for that subnet, trained with the diffusion loss (MSE to the noise) on timesteps drawn from
its interval only, optionally distilled (weight `distill`) towards the full-size supernet's prediction
on the same inputs. The supernet is not changed. Every group draws from a generator seeded by (seed,
group), so a group's weights depend only on its own settings, never on the other groups.

What the paper does that this does not: its groups are pruned from a base model by a proxy importance
search (here they are the supernet's subnets, chosen by the schedule: the prior, a search or by hand),
and it trains far longer. No EMA of the fine-tuned weights is kept (few steps at a small rate).

Files: the weights as one safetensors file beside the output schedule (<out stem>.weights.safetensors,
keys `group<i>.`), then the schedule (settings.weights names it with its SHA-256), both atomically; all
inputs are checked before anything trains or is written.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...config import DiffusionConfig
from ...diffusion import NoiseSchedule, sampling_timesteps
from ...errors import DDSMError
from ...io import write_atomic
from ...space.subnet import Subnet
from .weights import GroupWeights, WeightGroup


def plan_groups(subnets: Sequence[Subnet], diffusion: DiffusionConfig, snr_groups: int | None = None,
                timesteps: Sequence[int] | None = None) -> list[WeightGroup]:
    """Return the weight groups of a schedule run on `timesteps` (default: the uniform grid): runs of one
    subnet (cut at SNR group edges with `snr_groups`), each with the interval of timesteps it trains on
    (see the module doc)."""
    T = diffusion.timesteps
    timesteps = list(timesteps) if timesteps is not None else sampling_timesteps(T, len(subnets))
    label = [0] * len(subnets)
    if snr_groups:
        from .groups import group_index
        from .groups import snr_groups as find

        found = find(diffusion, snr_groups)
        label = [group_index(found, t) for t in timesteps]
    out, start = [], 0
    for (subnet, _), run in itertools.groupby(zip(subnets, label)):
        stop = start + len(list(run))
        lo = 0 if stop == len(subnets) else timesteps[stop] + 1
        hi = T - 1 if start == 0 else timesteps[start]
        out.append(WeightGroup(start, stop, subnet, (lo, hi)))
        start = stop
    return out


def weights_path(out: Path) -> Path:
    """Return where the group weights of schedule `out` go: <stem>.weights.safetensors beside it."""
    return out.with_name(f"{out.stem}.weights.safetensors")


def group_seed(seed: int, group: int) -> int:
    """Return the seed of one group's draws (its own stream: independent of the other groups)."""
    return (int(seed) * 1_000_003 + int(group)) % (2**63)


@dataclass
class FinetuneResult:
    """What finetune wrote and the networks it trained (eval mode), one per group."""

    schedule: Path
    weights: Path
    groups: list[WeightGroup]
    networks: dict[int, torch.nn.Module]
    losses: dict[int, float]  # mean diffusion loss over each group's last 10 steps (nan if not trained)


def check_finetune_args(out: Path, steps: int, batch_size: int, lr: float, distill: float,
                        snr_groups: int | None) -> None:
    """Raise DDSMError unless the finetune options make sense (before anything loads)."""
    if out.suffix.lower() != ".json":
        raise DDSMError(f"--out must end in .json, got {out.name}")
    if out.is_dir():
        raise DDSMError(f"--out {out} is a directory")
    if steps < 1 or batch_size < 1:
        raise DDSMError("finetune: --train-steps and --batch-size must be at least 1")
    if not (math.isfinite(lr) and lr > 0):
        raise DDSMError(f"finetune: --lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(distill) and 0 <= distill <= 1):
        raise DDSMError(f"finetune: --distill must be in [0, 1], got {distill}")
    if snr_groups is not None and snr_groups < 1:
        raise DDSMError(f"finetune: --snr-groups must be at least 1, got {snr_groups}")


def finetune_schedule(schedule_path: str | Path, supernet_dir: str | Path, out: str | Path, *, steps: int = 500,
                      lr: float = 1e-4, batch_size: int = 64, distill: float = 0.0, snr_groups: int | None = None,
                      seed: int = 0, device: str = "cpu", progress: bool = True,
                      only: Sequence[int] | None = None) -> FinetuneResult:
    """Fine-tune each group of a schedule on its own timesteps; write the weights and the schedule that
    names them (`out`); return what was written. Groups not in `only` (if given) keep the supernet's
    weights for their subnet."""
    from ...checkpoint import load_supernet
    from ...data import load_data
    from ...schedule import check_against, load_schedule
    from ...space.plugins import family_of_field

    out = Path(out)
    check_finetune_args(out, steps, batch_size, lr, distill, snr_groups)
    supernet = load_supernet(supernet_dir, device)
    schedule = load_schedule(schedule_path, supernet)
    dynamic = sorted({f for s in schedule.step_keys() for f in s.fields if family_of_field(f).dynamic})
    if dynamic:
        raise DDSMError(f"schedule {schedule_path} has steps whose {dynamic[0]} is decided per image: fine-tuned group "
                        "weights and it together are not supported (its parts were trained on the supernet's weights)")
    model, cfg = supernet.model, supernet.config
    timesteps = schedule.grid(cfg.diffusion.timesteps)
    subnets = model.step_subnets(schedule.subnets, timesteps)  # what each step runs (a stage: from its t)
    groups = plan_groups(subnets, cfg.diffusion, snr_groups, timesteps)
    if only is not None and not set(only) <= set(range(len(groups))):
        raise DDSMError(f"finetune: only groups {sorted(set(only))} asked for, the schedule has {len(groups)}")
    data = load_data(cfg.data)
    noise_schedule = NoiseSchedule(cfg.diffusion)
    networks, losses, teachers = {}, {}, {}
    for k, group in enumerate(groups):
        net = model.export(group.subnet).to(device)
        teacher = None
        if distill > 0:  # full size at the group's steps (a multi-stage supernet: at their stage)
            full = model.step_subnets([model.full], [timesteps[group.start]])[0]
            if full not in teachers:
                teachers[full] = model.export(full).to(device).eval().requires_grad_(False)
            teacher = teachers[full]
        if only is None or k in only:
            losses[k] = _train_group(net, group, k, (data, noise_schedule, cfg), teacher,
                                     GroupTraining(steps, lr, batch_size, distill, seed), device, progress)
        else:
            losses[k] = math.nan
        networks[k] = net.eval().requires_grad_(False)

    from safetensors.torch import save

    blob = save({f"group{k}.{name}": value.detach().cpu().contiguous()
                 for k, net in networks.items() for name, value in net.state_dict().items()})
    target = weights_path(out)
    info = {"steps": steps, "lr": lr, "batch_size": batch_size, "distill": distill, "snr_groups": snr_groups,
            "seed": seed, "trained": sorted(losses) if only is None else sorted(set(only)),
            "last_losses": [None if math.isnan(v) else round(v, 6) for v in losses.values()],
            "method": "Step-Adaptive Training per-group fine-tuning (a reconstruction of arXiv 2312.13307)"}
    weights = GroupWeights(path=target.resolve(), sha256=hashlib.sha256(blob).hexdigest(), groups=tuple(groups),
                           info=info)
    extra = dict(schedule.extra)
    if "quality" in extra:  # measured with the supernet's weights, not with these
        extra["quality_before_finetune"] = extra.pop("quality")
    result = replace(schedule, settings={**schedule.settings, "weights": weights}, extra=extra)
    check_against(result, supernet, out)
    data_out = result.to_dict(supernet, out.parent)  # everything checked and built before the first write
    write_atomic(target, lambda tmp: tmp.write_bytes(blob))
    from ...io import write_json_atomic

    write_json_atomic(out, data_out)
    return FinetuneResult(schedule=out, weights=target, groups=groups, networks=networks, losses=losses)


@dataclass(frozen=True)
class GroupTraining:
    """How every group is fine-tuned: steps, AdamW's rate, batch size, distillation weight, seed."""

    steps: int
    lr: float
    batch_size: int
    distill: float
    seed: int


def _train_group(net: torch.nn.Module, group: WeightGroup, k: int, source: tuple, teacher, how: GroupTraining,
                 device: str, progress: bool) -> float:
    """Train one group's network in place on its timesteps (`source`: the training images, the noise
    schedule and the supernet's config); return its mean loss over the last 10 steps."""
    data, noise_schedule, cfg = source
    steps, lr, batch_size, distill, seed = how.steps, how.lr, how.batch_size, how.distill, how.seed
    g = torch.Generator().manual_seed(group_seed(seed, k))
    torch.manual_seed(group_seed(seed, k))  # dropout, if the model has any
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    lo, hi = group.timesteps
    recent: list[float] = []
    bar = tqdm(range(steps), desc=f"finetune group {k} ({group.subnet.key}, t {lo}-{hi})", unit="step",
               disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0 = data.to_float(idx)
        if cfg.data.hflip:
            flip = torch.rand(batch_size, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(lo, hi + 1, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt, t, noise = noise_schedule.q_sample(x0, t, noise).to(device), t.to(device), noise.to(device)
        pred = net(xt, t)
        loss = F.mse_loss(pred, noise)
        recent = (recent + [loss.item()])[-10:]
        if teacher is not None:
            with torch.no_grad():
                target = teacher(xt, t)
            loss = (1 - distill) * loss + distill * F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        opt.step()
        bar.set_postfix({"loss": f"{recent[-1]:.4f}"})
    return sum(recent) / len(recent)
