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
    "load_run": "report", "front": "report", "hypervolume": "report", "pick": "report", "generations": "report",
    "run_info": "report", "budget_gflops": "config",
    "plot_front": "plots", "plot_schedule": "plots", "plot_hypervolume": "plots", "plot_grids": "plots",
    "export_schedule": "export", "load_schedule": "schedule", "save_schedule": "schedule", "Schedule": "schedule",
    "load_supernet": "checkpoint", "load_config": "config", "train": "training", "generate": "sampling",
    "evaluate": "evaluation", "run_search": "search.runner", "quickstart": "pipeline", "DDSMError": "errors",
    "Subnet": "subnet", "SubnetSpace": "subnet", "build_supernet": "backbones",
    "ExitPolicy": "exit_policy", "finetune_exit": "exit_stage",
    "import_diffusers": "imports.diffusers_unet", "reorder_by_importance": "imports.importance",
    "find_stages": "stages", "interval_cluster": "stages",
    "prior_schedule": "step_groups", "DDSMPipeline": "deploy_pipeline", "export_onnx": "deploy.onnx_export",
}
# No submodule may share a name with a public function: importing `ddsm_search.train` would bind the
# module as the package attribute `train` and hide the function (tests/test_api.py checks this).
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the module that defines a public name the first time it is used."""
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ddsm_search' has no attribute {name!r}")
