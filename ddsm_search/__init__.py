"""ddsm-search: diffusion supernets and per-step subnet schedules on the FLOPs-quality front.

The Python API, loaded on first use (so `import ddsm_search` stays light):

    import ddsm_search as ds
    table = ds.load_run("results/digits-search")   # one row per schedule, `on_front` marks the front
    ds.front(table); ds.hypervolume(table); ds.pick(table, "50%")
    ds.Subnet.parse("width=0.5,depth=4")            # what one step runs
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_run": "report.tables", "front": "report.tables", "hypervolume": "report.tables", "pick": "report.tables",
    "generations": "report.tables", "run_info": "report.tables", "steps": "report.tables",
    "row_steps": "report.tables", "row_subnets": "report.tables", "budget_gflops": "config",
    "plot_front": "report.plots", "plot_schedule": "report.plots", "plot_hypervolume": "report.plots",
    "plot_grids": "report.plots",
    "export_schedule": "deploy.export", "load_schedule": "schedule", "save_schedule": "schedule", "Schedule": "schedule",
    "load_supernet": "checkpoint", "load_config": "config", "train": "training", "generate": "sampling",
    "evaluate": "evaluation.quality", "run_search": "search.runner", "quickstart": "pipeline", "DDSMError": "errors",
    "Subnet": "space.subnet", "SubnetSpace": "space.subnet", "build_supernet": "backbones.registry",
    "ExitPolicy": "methods.early_exit.policy", "finetune_exit": "methods.early_exit.finetune",
    "import_diffusers": "methods.pretrained.diffusers_unet", "reorder_by_importance": "methods.pretrained.importance",
    "find_stages": "methods.multistage.stages", "interval_cluster": "methods.multistage.stages",
    "prior_schedule": "methods.step_groups.groups", "DDSMPipeline": "deploy.diffusers_pipeline",
    "export_onnx": "deploy.onnx_export",
}
# No submodule may share a name with a public function: importing `ddsm_search.train` would bind the
# module as the package attribute `train` and hide the function (tests/test_api.py checks this).
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the module that defines a public name the first time it is used."""
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ddsm_search' has no attribute {name!r}")
