"""Feature caching's plug-in points: the schedule setting `cache` (one value per step), the steps'
`cache` field, keep and reuse steps as the step runtime, a cached step's FLOPs measured on the
backbone, and one gene per segment (off, or a caching interval with a branch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...errors import DDSMError
from ...space.plugins import MethodFamily
from .steps import KEEP, REUSE, check_values, parse, pattern


@dataclass(frozen=True)
class CacheSetting:
    """A schedule's caching: per step None, 'keepB' or 'reuseB' (see steps)."""

    values: tuple

    @property
    def steps(self) -> int:
        """Return the number of steps it covers."""
        return len(self.values)

    @property
    def active(self) -> bool:
        """Return True if some step keeps or reuses features."""
        return any(v is not None for v in self.values)


@dataclass(frozen=True)
class CacheGenes:
    """One gene per segment: 0 is off, i > 0 the i-th (interval, branch) option, intervals outermost.

    A segment caching at a branch its subnet does not have (a DiT subnet too shallow for it) runs plain:
    several genomes then stand for one schedule (evaluated once, by its key)."""

    intervals: tuple[int, ...]
    branches: tuple[int, ...]
    limit: Callable = field(compare=False, repr=False)  # subnet -> the branches its cached steps may use
    field: str = "cache"

    @property
    def options(self) -> list[tuple[int, int]]:
        """Return the (interval, branch) of each gene above 0."""
        return [(i, b) for i in self.intervals for b in self.branches]

    @property
    def choices(self) -> int:
        """Return the number of choices of each gene."""
        return len(self.options) + 1

    def decode(self, gene: int, subnet, start: int, count: int) -> list:
        """Return the values of the `count` steps of a segment: keep on its first step and every
        interval-th after it, reuse between (None: off)."""
        if int(gene) == 0:
            return [None] * count
        interval, branch = self.options[int(gene) - 1]
        return [None] * count if branch > self.limit(subnet) else pattern(interval, branch, count)

    def encode(self, values) -> int:
        """Return the gene of a segment's values, or raise DDSMError if no option gives them."""
        values = list(values)
        if all(v is None for v in values):
            return 0
        for k, (interval, branch) in enumerate(self.options):
            if pattern(interval, branch, len(values)) == values:
                return k + 1
        raise DDSMError(f"caching {' '.join(str(v) for v in values)} is not a search choice (a keep step on the "
                        f"segment's first step and every interval-th, intervals {list(self.intervals)}, branches "
                        f"{list(self.branches)})")

    def sweep(self) -> list[int]:
        """Return the genes of the uniform schedules at full size: each option at every segment."""
        return list(range(1, self.choices))


def _backbone_branches(model, subnet, where: str) -> int:
    branches = model.cache_branches_at(subnet)
    if branches == 0:
        raise DDSMError(f"{where}: feature caching needs a backbone with cache points (a U-Net or a DiT); "
                        f"this {type(model).__name__} has none")
    return branches


class Caching(MethodFamily):
    """Training-free feature caching: DeepCache on the U-Net, block caching on the DiT (methods/caching)."""

    name = "caching"
    summary = "DeepCache / block caching: cached steps run the network's outer part and reuse a full step's features"
    setting = "cache"
    field = "cache"
    stateful = True

    def read_setting(self, value, steps: int, path):
        where = f"schedule {path}: settings.cache"
        if not isinstance(value, dict) or set(value) != {"steps"} or not isinstance(value["steps"], list):
            raise DDSMError(f"{where}: expected {{\"steps\": [one of null, \"keepB\", \"reuseB\" per step]}}")
        if len(value["steps"]) != steps:
            raise DDSMError(f"{where}: {len(value['steps'])} values for {steps} steps")
        try:
            check_values(value["steps"])
        except DDSMError as exc:
            raise DDSMError(f"{where}: {exc}") from None
        return CacheSetting(tuple(value["steps"]))

    def write_setting(self, setting, supernet, base):
        return {"steps": list(setting.values)} if setting.active else None

    def check_setting(self, setting, schedule, supernet, where: str) -> None:
        if not setting.active:
            return
        if setting.steps != schedule.steps:
            raise DDSMError(f"{where}: {setting.steps} caching values for {schedule.steps} steps")
        exit_policy = schedule.settings.get("exit")
        if exit_policy is not None and exit_policy.dynamic:
            raise DDSMError(f"{where}: an exit policy together with feature caching is not supported (a cached "
                            "step reuses features that each image's exit would have left uncomputed)")
        steps = schedule.step_keys()
        try:
            parsed = check_values(setting.values, [s.replace(cache=None).key for s in steps])
        except DDSMError as exc:
            raise DDSMError(f"{where}: {exc}") from None
        if supernet is None:
            return
        for i, (entry, subnet) in enumerate(zip(parsed, supernet.step_subnets(schedule.subnets, schedule.grid(
                supernet.config.diffusion.timesteps)))):
            if entry is not None:
                branches = _backbone_branches(supernet.model, subnet, where)
                if entry[1] > branches:
                    raise DDSMError(f"{where}: step {i} caches at branch {entry[1]}, but {subnet.key} has branches "
                                    f"1 .. {branches}")

    def step_values(self, setting, steps: int):
        return list(setting.values) if setting.active else None

    def setting_from_values(self, values):
        return CacheSetting(tuple(values))

    def wrap(self, runtime, step, network):
        from .features import KeepStep, ReuseStep

        value = step.get(self.field)
        if value is None:
            return None
        role, branch = parse(value)
        where = f"step {step.key}"
        branches = _backbone_branches(runtime.supernet.model, step.subnet, where)
        if branch > branches or not hasattr(network, "deep_forward"):
            raise DDSMError(f"{where}: branch {branch} is not a cache point of its network (branches 1 .. {branches})")
        owner = step.replace(cache=None).key
        return (KeepStep if role == KEEP else ReuseStep)(network, branch, owner)

    def step_flops(self, supernet, subnet, value):
        if value is None:
            return None
        role, branch = parse(value)
        if role != REUSE:
            return None  # a keep step runs the whole subnet
        key = (self.name, supernet.cost, subnet, branch)
        if key not in supernet.measured:
            from ...backbones.cost import cached_step_flops

            _backbone_branches(supernet.model, subnet, f"a cached step of {subnet.key}")
            masks = supernet.masks if supernet.cost == "sparse" else None
            dense, sparse = cached_step_flops(supernet.config.model, supernet.image_shape, subnet, branch, masks)
            supernet.measured[key] = sparse if masks is not None else dense
        return supernet.measured[key]

    def baselines(self, model, search, steps: int):
        """Uniform caching at full size: each of search.cache_intervals (default 2, 3 and 5, DeepCache's
        uniform 1:N) at each branch of search.cache_branches the backbone has."""
        most = model.cache_branches_at(model.full)
        if most == 0:
            return []
        intervals = search.cache_intervals or (2, 3, 5)
        return [(f"cache {i}:{b}", pattern(i, b, steps)) for i in intervals for b in search.cache_branches
                if b <= most and i <= steps]

    def genes(self, model, search):
        if not search.cache_intervals:
            return None
        where = "search.cache_intervals"
        most = _backbone_branches(model, model.full, where)
        wide = [b for b in search.cache_branches if b > most]
        if wide:
            raise DDSMError(f"search.cache_branches: {wide} beyond the {most} branches of the full-size network")
        return CacheGenes(tuple(sorted(search.cache_intervals)), tuple(sorted(search.cache_branches)),
                          model.cache_branches_at)
