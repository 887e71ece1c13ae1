"""Early exit's plug-in points: the schedule setting `exit`, the steps' `exit` field, the per-image exit
as a step's runtime (with the heads kept beside the supernet), one threshold gene per segment, and
the shallowest depth as a dynamic step's cost bound."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DDSMError
from ...space.plugins import MethodFamily

SETTING_KEYS = {"threshold", "thresholds", "heads_sha256"}


@dataclass(frozen=True)
class ExitGenes:
    """One gene per segment: 0 is "off" (the static subnet), i > 0 the i-th threshold, highest first.

    A segment whose depth cap is the supernet's shallowest depth has nowhere to exit before it: it is
    static whatever its gene, so several genomes stand for one schedule (evaluated once, by its key)."""

    thresholds: tuple[float, ...]  # highest (most blocks run) first
    shallowest: int
    field: str = "exit"

    @property
    def choices(self) -> int:
        """Return the number of choices of each gene."""
        return len(self.thresholds) + 1

    def decode(self, gene: int, subnet, start: int, count: int) -> list:
        """Return the thresholds a gene gives the `count` steps of a segment running `subnet` from step
        `start` (None: static): one threshold for all of them."""
        value = None if int(gene) == 0 or subnet["depth"] <= self.shallowest else self.thresholds[int(gene) - 1]
        return [value] * count

    def encode(self, values) -> int:
        """Return the gene of a segment's thresholds (all None: 0)."""
        distinct = set(values)
        if len(distinct) > 1:
            raise DDSMError("a segment's steps use several exit thresholds; one segment has one")
        value = distinct.pop() if distinct else None
        if value is None:
            return 0
        if value not in self.thresholds:
            raise DDSMError(f"exit threshold {value!r} is not a search choice ({', '.join(map(repr, self.thresholds))})")
        return self.thresholds.index(value) + 1

    def sweep(self) -> list[int]:
        """Return the genes of the uniform schedules at full size: each threshold at every step."""
        return list(range(1, self.choices))


class EarlyExit(MethodFamily):
    """AdaDiff's per-image early exit on a DiT with certainty heads (methods/early_exit)."""

    name = "early_exit"
    summary = "AdaDiff's dynamic exit: each image leaves a DiT step at the first depth its certainty head allows"
    setting = "exit"
    field = "exit"
    addons = ("exit_heads.safetensors", "exit_heads.json")
    dynamic = True

    def read_setting(self, value, steps: int, path):
        from .policy import ExitPolicy

        where = f"schedule {path}"
        if not isinstance(value, dict) or not ({"threshold", "thresholds"} & set(value)):
            raise DDSMError(f"{where}: settings.exit: expected {{\"thresholds\": [one per step]}} or {{\"threshold\": T}}")
        unknown = sorted(set(value) - SETTING_KEYS)
        if unknown or {"threshold", "thresholds"} <= set(value):
            raise DDSMError(f"{where}: settings.exit: unknown or conflicting keys {unknown or ['threshold', 'thresholds']}")
        heads = value.get("heads_sha256")
        if heads is not None and not isinstance(heads, str):
            raise DDSMError(f"{where}: settings.exit.heads_sha256: expected text, got {heads!r}")
        given = value["thresholds"] if "thresholds" in value else value["threshold"]
        if "thresholds" in value and not isinstance(given, list):
            raise DDSMError(f"{where}: settings.exit.thresholds: expected a list (one per step), got {given!r}")
        try:
            policy = ExitPolicy.of(given, steps)
        except DDSMError as exc:
            raise DDSMError(f"{where}: settings.exit: {exc}") from None
        return ExitPolicy(policy.thresholds, heads)

    def write_setting(self, policy, supernet, base):
        from .finetune import heads_sha256

        if not policy.dynamic:
            return None
        return {"thresholds": policy.to_json(), "heads_sha256": policy.heads_sha256 or heads_sha256(supernet)}

    def check_setting(self, policy, schedule, supernet, where: str) -> None:
        if not policy.dynamic:
            return
        if policy.steps != schedule.steps:
            raise DDSMError(f"{where}: {policy.steps} exit thresholds for {schedule.steps} steps")
        if "weights" in schedule.settings:
            raise DDSMError(f"{where}: settings: an exit policy together with fine-tuned group weights is not "
                            "supported (the exit heads were trained on the supernet's weights, not on the groups' "
                            "fine-tuned ones)")
        if supernet is None:
            return
        from .finetune import heads_sha256

        try:
            current = heads_sha256(supernet)
        except DDSMError as exc:
            raise DDSMError(f"{where} has an exit policy: {exc}") from None
        if policy.heads_sha256 is not None and policy.heads_sha256 != current:
            raise DDSMError(f"{where}: its exit policy was made with other exit heads than those beside "
                            f"{supernet.path} (run the search again, or put its heads back)")

    def step_values(self, policy, steps: int):
        return list(policy.thresholds) if policy.dynamic else None

    def setting_from_values(self, values):
        from .policy import ExitPolicy

        return ExitPolicy(tuple(values))

    def wrap(self, runtime, step, network):
        from .finetune import load_exit_heads
        from .heads import DynamicExitDenoiser

        threshold = step.get(self.field)
        if threshold is None:
            return None
        supernet = runtime.supernet
        heads = runtime.resource((self.name, "heads"), lambda: load_exit_heads(supernet, runtime.device))
        exits = [d for d in supernet.model.space.choices("depth") if d <= step.subnet["depth"]]
        return DynamicExitDenoiser(network, heads, threshold, exits=exits)

    def lower_bound(self, subnet, value, space):
        """A dynamic step may execute as little as the shallowest depth (its heads left out)."""
        return subnet if value is None else subnet.replace(depth=min(space.choices("depth")))

    def genes(self, model, search):
        if not search.exit_thresholds:
            return None
        supernet_space = model.space
        if "depth" not in supernet_space.names:
            raise DDSMError("search.exit_thresholds: early exit needs a supernet with a depth axis (a DiT)")
        thresholds = tuple(sorted({float(t) for t in search.exit_thresholds}, reverse=True))
        return ExitGenes(thresholds, min(supernet_space.choices("depth")))
