"""Step-Adaptive Training's timestep groups and its SNR-to-size prior, as a reconstruction.

Step-Adaptive Training (Li et al., arXiv 2312.13307, "Not All Steps are Equal") splits the diffusion
timesteps into groups by signal-to-noise ratio, gives each group a model size from the difficulty of
its denoising task, estimated from the SNR, and fine-tunes one model per group. It has no public code;
what follows is our reading of it, with every free choice an explicit parameter.

Grouping rule (`snr_groups`): K contiguous groups of timesteps of equal spans of log-SNR,
lambda(t) = log(abar_t / (1 - abar_t)), between lambda(T-1) (the noisiest timestep) and lambda(0)
(the cleanest). lambda falls strictly with t, so every group is one contiguous run of timesteps; groups
are numbered noisiest first (group 0 holds t = T-1), the order a sampler meets them. Where a span holds
no whole timestep (K close to T, or the steep end of the linear schedule near t = 0), its edge is moved
by the fewest timesteps that give every group at least one; that is the only departure from equal spans.

Size rule (`group_sizes`): the hardness of group g is d_g in [0, 1], its mean log-SNR placed between
the groups' lowest and highest means; with `harder="clean"` (default) the cleanest group is the hardest
(d = 1) and the noisiest the easiest (d = 0). Its size is s_g = d_g ** gamma, and on every axis of the
rule the group runs choice index round((1 - s_g) * (n - 1)) of the axis's n choices (largest first):
the hardest group runs full size, the easiest the smallest choice, the others in between (gamma > 1:
more groups small, cheaper; gamma < 1: more groups large). One group (K = 1) runs full size.

Which way is harder: the paper estimates difficulty from the SNR; we read it (its text here: the
abstract) as the epsilon-prediction task being harder at high SNR. At low SNR x_t is almost the noise
itself, so predicting the noise is nearly the identity and its MSE tends to 0 as t -> T, while near
t = 0 the noise is a faint residue to be told apart from image detail, where the epsilon loss of a
trained model is largest. So by default larger subnets run where the SNR is high (late, clean steps).
This is an assumption, not a measurement: DDSM's searched schedules often spend their large networks
elsewhere, which is why `harder="noisy"` reverses the rule and why the search, seeded with the prior
(`prior_genome`), is free to leave it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...config import DiffusionConfig
from ...diffusion import NoiseSchedule, sampling_timesteps
from ...errors import DDSMError
from ...space.subnet import Subnet, SubnetSpace

HARDER = ("clean", "noisy")


@dataclass(frozen=True)
class TimestepGroup:
    """A contiguous run of timesteps first .. last (inclusive) and its band of log-SNR."""

    index: int  # 0 = the noisiest group (it holds t = T-1)
    first: int  # its smallest timestep
    last: int  # its largest timestep
    band: tuple[float, float]  # the rule's log-SNR band (low, high) the group was cut from
    mean_logsnr: float  # mean log-SNR of its timesteps

    def __contains__(self, t: int) -> bool:
        return self.first <= int(t) <= self.last

    @property
    def size(self) -> int:
        """Return the number of timesteps in the group."""
        return self.last - self.first + 1


def snr_groups(diffusion: DiffusionConfig, k: int) -> list[TimestepGroup]:
    """Return K contiguous timestep groups of equal log-SNR spans, noisiest first (see the module doc)."""
    T = diffusion.timesteps
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
        raise DDSMError(f"timestep groups: need between 1 and {T} groups (the timesteps), got {k!r}")
    lam = NoiseSchedule(diffusion).log_snr()
    if not np.all(np.isfinite(lam)) or not np.all(np.diff(lam) < 0):
        raise DDSMError("timestep groups: the noise schedule's log-SNR is not finite and strictly falling")
    top, bottom = float(lam[0]), float(lam[-1])
    levels = [top - j * (top - bottom) / k for j in range(k + 1)]  # band edges, cleanest first
    # edges[j]: the first timestep of the j-th group counted from the clean end; lam falls with t, so
    # the timesteps above level j are exactly the first count(lam > level_j) of them
    edges = [0] + [int(np.count_nonzero(lam > levels[j])) for j in range(1, k)] + [T]
    for j in range(1, k):  # every group keeps at least one timestep
        edges[j] = max(edges[j], edges[j - 1] + 1)
    for j in range(k - 1, 0, -1):
        edges[j] = min(edges[j], edges[j + 1] - 1)
    groups = []
    for j in range(k):
        first, last = edges[j], edges[j + 1] - 1
        groups.append(TimestepGroup(index=k - 1 - j, first=first, last=last, band=(levels[j + 1], levels[j]),
                                    mean_logsnr=float(lam[first:last + 1].mean())))
    return groups[::-1]


def group_index(groups: Sequence[TimestepGroup], t: int) -> int:
    """Return the index of the group holding timestep t."""
    for g in groups:
        if t in g:
            return g.index
    raise DDSMError(f"timestep {t} is in no group (groups cover 0 .. {max(g.last for g in groups)})")


def hardness(groups: Sequence[TimestepGroup], harder: str = "clean") -> list[float]:
    """Return each group's hardness d in [0, 1] (1: the hardest) from its mean log-SNR."""
    if harder not in HARDER:
        raise DDSMError(f"harder: expected one of {', '.join(HARDER)}, got {harder!r}")
    means = [g.mean_logsnr for g in groups]
    low, high = min(means), max(means)
    if high == low:
        return [1.0] * len(groups)
    cleanness = [(m - low) / (high - low) for m in means]
    return cleanness if harder == "clean" else [1 - c for c in cleanness]


def choice_index(size: float, n: int) -> int:
    """Return the choice (0 = largest of n) that a size in [0, 1] runs: round((1 - size) * (n - 1))."""
    return int(min(max(math.floor((1 - size) * (n - 1) + 0.5), 0), n - 1))


def group_sizes(space: SubnetSpace, groups: Sequence[TimestepGroup], *, gamma: float = 1.0,
                harder: str = "clean", axes: Sequence[str] | None = None) -> list[Subnet]:
    """Return one subnet of `space` per group by the size rule (axes not in `axes` stay full)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise DDSMError(f"gamma: expected a finite number > 0, got {gamma!r}")
    axes = list(space.names if axes is None else axes)
    for axis in axes:
        space.choices(axis)  # names an unknown axis
    out = []
    for d in hardness(groups, harder):
        size = 1.0 if len(groups) == 1 else d ** gamma
        values = {a: space.choices(a)[choice_index(size, len(space.choices(a)))] for a in axes}
        out.append(space.check(space.full.replace(**values)))
    return out


def prior_subnets(space: SubnetSpace, diffusion: DiffusionConfig, timesteps: Sequence[int], groups: int = 4,
                  **rule) -> list[Subnet]:
    """Return the size rule's subnet for each of these timesteps (`rule`: gamma, harder, axes)."""
    found = snr_groups(diffusion, groups)
    sizes = group_sizes(space, found, **rule)
    return [sizes[group_index(found, t)] for t in timesteps]


def prior_schedule(supernet, steps: int | None = None, groups: int = 4, **rule) -> list[Subnet]:
    """Return the prior schedule of a loaded supernet (checkpoint.Supernet): one subnet per sampling step
    (default: its config's sample.steps), noisiest first, from K SNR groups and the size rule."""
    steps = supernet.config.sample.steps if steps is None else steps
    diffusion = supernet.config.diffusion
    timesteps = sampling_timesteps(diffusion.timesteps, steps)
    return prior_subnets(supernet.model.space, diffusion, timesteps, groups, **rule)


def prior_genome(space, diffusion: DiffusionConfig, groups: int, **rule) -> tuple[int, ...]:
    """Return the genome of the prior schedule in a search space (search.space.SearchSpace): the rule
    over the searched axes and choices (others at their base value), each segment taking the largest
    subnet any of its steps asks for, so that the seed is never smaller than the prior."""
    timesteps = sampling_timesteps(diffusion.timesteps, space.steps)
    per_step = prior_subnets(space.searched, diffusion, timesteps, groups, **rule)
    schedule = []
    for start, stop in space.bounds:
        values = {a: max(s[a] for s in per_step[start:stop]) for a in space.searched.names}
        schedule += [space.subnet(values)] * (stop - start)
    return space.encode(schedule)


def seed_genomes(space, diffusion: DiffusionConfig, groups: int | None, **rule) -> list[tuple[int, ...]]:
    """Return the genomes to add to a search's first generation for `search.seed_prior: K` (none if K is
    None or 0)."""
    return [prior_genome(space, diffusion, groups, **rule)] if groups else []
