"""Step groups' plug-in points: the schedule setting `weights` (per-group fine-tuned networks, kept
beside the schedule), the steps' `group` field, a group's network as a step's runtime, and the
SNR-to-size prior as a seed of a search's first generation (`search.seed_prior`)."""

from __future__ import annotations

from ...errors import DDSMError
from ...space.plugins import MethodFamily


class StepGroups(MethodFamily):
    """Step-Adaptive Training, reconstructed: SNR groups, their size prior, per-group fine-tuning."""

    name = "step_groups"
    summary = "Step-Adaptive Training: timestep groups by SNR, a size prior per group, per-group fine-tuned weights"
    setting = "weights"
    field = "group"

    def read_setting(self, value, steps: int, path):
        from .weights import read_weights

        return read_weights(value, steps, path)

    def write_setting(self, weights, supernet, base):
        return weights.to_json(base)

    def check_setting(self, weights, schedule, supernet, where: str) -> None:
        if supernet is None:
            return
        timesteps = schedule.grid(supernet.config.diffusion.timesteps)
        try:
            weights.check(supernet.model.step_subnets(schedule.subnets, timesteps), supernet.model.space,
                          timesteps, supernet.config.diffusion.timesteps)
        except DDSMError as exc:
            raise DDSMError(f"{where}: {exc}") from None

    def copy_files(self, weights, folder):
        from .weights import copy_weights

        return copy_weights(weights, folder)

    def step_values(self, weights, steps: int):
        if weights.steps != steps:
            raise DDSMError(f"the weight groups cover {weights.steps} steps but the schedule has {steps}")
        return weights.refs()

    def network(self, runtime, step):
        ref = step.get(self.field)
        if ref is None:
            return None
        for weights in runtime.settings.get(self.setting, []):
            if weights.sha256 == ref.weights:
                return weights.network(runtime.model, step.subnet, ref, runtime.device)
        raise DDSMError(f"step {step.key} runs fine-tuned group weights: make its plan from the schedule that "
                        "names them (settings.weights)")

    def seed_genomes(self, space, diffusion, search) -> list:
        from .groups import seed_genomes

        return seed_genomes(space, diffusion, search.seed_prior)
