"""The plug-in points of the step-aware space, and the table of method families that implement them.

A method family (a folder under `ddsm_search/methods/`) exposes one `MethodFamily` as `PLUGIN` in its
`__init__`, implementing only the points it needs; every default here does nothing. The points:

- schedule settings: the key a family owns in a schedule file's `settings` (read, write, check
  against the supernet, copy the files it names beside another schedule), and the per-step values it
  gives the schedule's steps (its step `field`);
- step runtime: the static network a step runs (`network`, e.g. a group's fine-tuned copy) and what
  wraps it (`wrap`, e.g. a per-image early exit with its heads), made once per `sampling.Runtime`;
- supernet add-on files: files kept beside a supernet (masks, heads) read when it loads, or listed;
- training: a hook into every training step (sparse masks);
- search genes, seeds and baselines: genes per segment for its field, genomes for the first
  generation, and the family's own uniform schedules that every report compares a search with;
- cost: what a step with the family's value costs when it is not its subnet's (a cached step), and
  the cheapest subnet a dynamic step may run, for budgets known before sampling (what it executed is
  measured while sampling: `space.steps.ExecutedRecord`).

The core never imports a family by name: `families()` loads the table's modules by their names, as
entry points are loaded, so the core's imports name no method and families import none of each other.
"""

from __future__ import annotations

from importlib import import_module
from typing import Sequence

from ..errors import DDSMError

# the built-in families, in the order their fields appear in keys and their hooks run
FAMILIES = ("early_exit", "step_groups", "multistage", "sparsity", "pretrained", "caching")


class MethodFamily:
    """A method family's plug-in. Subclasses set `name` and override the points they implement."""

    name: str = ""
    summary: str = ""  # one line: what the family does
    setting: str | None = None  # the key it owns in a schedule file's settings
    field: str | None = None  # the name of its per-step value in a Step (and in plan keys)
    addons: tuple[str, ...] = ()  # files it may keep beside a supernet
    dynamic: bool = False  # its field decides per image, while sampling, how much network a step runs
    stateful: bool = False  # its field makes a step keep, or reuse, what an earlier step computed

    # -- schedule settings -------------------------------------------------------------------------
    def read_setting(self, value, steps: int, where: str):
        """Return the setting object of a schedule file's settings[self.setting] (raise DDSMError naming `where`)."""
        raise DDSMError(f"{where}: settings.{self.setting} cannot be read")

    def write_setting(self, setting, supernet, base) -> dict | None:
        """Return what settings[self.setting] holds in a schedule file written to folder `base` (None: nothing)."""
        return None

    def check_setting(self, setting, schedule, supernet, where: str) -> None:
        """Raise DDSMError unless the setting fits the schedule (and `supernet`, if not None)."""

    def copy_files(self, setting, folder):
        """Return the setting naming copies, in `folder`, of the files it names beside its schedule (a saved
        pipeline's schedule is written there); by default it names none: the setting itself."""
        return setting

    def step_values(self, setting, steps: int) -> list | None:
        """Return this family's value for each step (None where a step has none), or None for none at all."""
        return None

    def setting_from_values(self, values: Sequence):
        """Return the setting that gives steps these values (a searched schedule exported), or None."""
        return None

    # -- step runtime ----------------------------------------------------------------------------------
    def network(self, runtime, step):
        """Return the static network `step` runs in place of its subnet's export (None: the export)."""
        return None

    def wrap(self, runtime, step, network):
        """Return a denoiser running `network` as `step` asks (None: the network on its backend as it is).
        A wrapped step runs on torch; a denoiser with `drain()` reports what each image executed."""
        return None

    def lower_bound(self, subnet, value, space):
        """Return the cheapest subnet a step with this `value` may execute (a budget's check before sampling)."""
        return subnet

    # -- supernet add-on files -------------------------------------------------------------------------
    def load_addons(self, supernet, meta: dict, weights: dict) -> None:
        """Read this family's files beside a supernet being loaded (meta.json says which) into it."""

    # -- training ------------------------------------------------------------------------------------------
    def training_hook(self, cfg, model):
        """Return a hook into the training steps of `cfg` (see training.TrainingRun), or None."""
        return None

    # -- search genes and seeds --------------------------------------------------------------------------
    def genes(self, model, search):
        """Return the genes this family adds per segment to a search of supernet `model` (a SlimModel:
        its `space`, its backbone) under `search` (its config), or None.

        Genes offer: `field` (the step field they decide), `choices` (per gene), `decode(gene, subnet,
        start, count)` (the values of the `count` steps of a segment running `subnet` from step `start`;
        None: nothing), `encode(values)` (the gene of a segment's values, or DDSMError) and `sweep()`
        (the genes of the uniform schedules at full size in the first generation)."""
        return None

    def step_flops(self, supernet, subnet, value) -> int | None:
        """Return the FLOPs per image of a step running `subnet` with this family's `value`, where the
        value changes what a step runs (None: the subnet's, from the supernet's table)."""
        return None

    def baselines(self, model, search, steps: int) -> list:
        """Return what a user of this family has without any search, at full size over `steps` steps:
        (label, the family's value at each step) pairs (feature caching: each uniform interval)."""
        return []

    def seed_genomes(self, space, diffusion, search) -> list:
        """Return genomes for the first generation of a search of `space` (search.genome.SearchSpace)."""
        return []


_LOADED: dict[str, MethodFamily] = {}


def families() -> list[MethodFamily]:
    """Return the plug-ins of every method family in the table, loaded on first use."""
    for name in FAMILIES:
        if name not in _LOADED:
            plugin = import_module(f"ddsm_search.methods.{name}").PLUGIN
            if not isinstance(plugin, MethodFamily) or plugin.name != name:
                raise TypeError(f"ddsm_search.methods.{name}.PLUGIN is not the {name} MethodFamily")
            _LOADED[name] = plugin
    return [_LOADED[name] for name in FAMILIES]


def family_of_setting(key: str) -> MethodFamily | None:
    """Return the family that owns schedule setting `key`, or None."""
    return next((f for f in families() if f.setting == key), None)


def family_of_field(field: str) -> MethodFamily:
    """Return the family that owns step field `field`, or raise DDSMError."""
    for f in families():
        if f.field == field:
            return f
    raise DDSMError(f"no method family gives steps a {field!r} (fields: "
                    f"{', '.join(f.field for f in families() if f.field)})")


def settings_known() -> list[str]:
    """Return the schedule settings some family reads."""
    return [f.setting for f in families() if f.setting]
