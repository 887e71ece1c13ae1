"""The deployable pipeline object: a schedule (its subnets, exit policy, group weights) run exactly as
`generate` runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.deploy.diffusers_pipeline import DIFFUSERS, DDSMPipeline, diffusers_failure
from ddsm_search.errors import DDSMError
from ddsm_search.methods.step_groups.finetune import finetune_schedule
from ddsm_search.sampling import Runtime, generate
from ddsm_search.schedule import Schedule, load_schedule, save_schedule
from ddsm_search.space.subnet import Subnet
from ddsm_search.solvers.base import Solver
from tests.conftest import tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _expected(supernet, schedule, *, settings: bool = True, **kwargs) -> torch.Tensor:
    """Return generate's images of the schedule (without its settings: its static subnets alone), as the
    pipeline returns them."""
    runtime = Runtime(supernet)
    plan = runtime.plan_schedule(schedule) if settings else runtime.plan(schedule.subnets, solver=schedule.solver)
    images = generate(plan, **kwargs)
    return (images / 2 + 0.5).clamp(0, 1)


def test_pipeline_images_equal_generate(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    subnets = [Subnet.of(width=w) for w in (0.5, 0.5, 0.75, 1.0, 1.0)]
    path = save_schedule(tmp_path / "s.json", Schedule(subnets=subnets, solver=Solver("ddim", eta=0.5)), supernet)
    pipe = DDSMPipeline.from_schedule(path)  # the supernet the schedule recorded
    if DIFFUSERS:
        from diffusers import DiffusionPipeline

        assert isinstance(pipe, DiffusionPipeline)
    schedule = load_schedule(path, supernet)
    out = pipe(batch_size=3, seed=4, output_type="pt")
    assert torch.equal(out.images, _expected(supernet, schedule, n=3, seed=4))
    array = pipe(batch_size=3, seed=4).images
    assert array.shape == (3, *supernet.image_shape[1:], supernet.image_shape[0]) and array.dtype == np.float32
    assert np.array_equal(array, out.images.permute(0, 2, 3, 1).numpy())
    mine = pipe(batch_size=2, generator=torch.Generator().manual_seed(9), output_type="pt", return_dict=False)[0]
    theirs = _expected(supernet, schedule, n=2, seed=0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(mine, theirs) and torch.equal(mine, pipe(batch_size=2, seed=9, output_type="pt").images)
    pil = pipe(batch_size=2, seed=1, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == supernet.image_shape[1:][::-1]
    assert pipe.num_inference_steps == 5 and pipe.device == torch.device("cpu")
    for bad, message in (({"num_inference_steps": 10}, "runs 5 steps"), ({"output_type": "latent"}, "output_type"),
                         ({"seed": 1, "generator": torch.Generator()}, "not both")):
        with pytest.raises(DDSMError, match=message):
            pipe(batch_size=1, **bad)


def test_pipeline_runs_group_weights(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    plain = save_schedule(tmp_path / "p.json", Schedule(subnets=[Subnet.of(width=0.5)] * 2 +
                                                        [Subnet.of(width=1.0)] * 3), supernet)
    tuned = finetune_schedule(plain, tiny_supernet, tmp_path / "t.json", steps=2, batch_size=4, lr=1e-3,
                              progress=False).schedule
    schedule = load_schedule(tuned, supernet)
    images = DDSMPipeline.from_schedule(tuned, tiny_supernet)(batch_size=3, seed=2, output_type="pt").images
    assert torch.equal(images, _expected(supernet, schedule, n=3, seed=2))
    assert not torch.equal(images, _expected(supernet, schedule, settings=False, n=3, seed=2))


def test_pipeline_runs_exit_policy(tmp_path):
    data = tiny_dict()
    data["model"] = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
                     "widths": [1.0, 0.5], "depths": [4, 2]}
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(data))
    net = tmp_path / "net"
    common = ["--quiet", "--device", "cpu"]
    assert main(["train", str(tmp_path / "dit.yaml"), "--out", str(net), "--steps", "2", *common]) == 0
    assert main(["finetune-exit", str(net), "--steps", "2", "--batch-size", "4", *common]) == 0
    supernet = load_supernet(net)
    path = tmp_path / "exit.json"
    path.write_text(json.dumps({"subnets": [{"width": 1.0}] * 5, "settings": {"exit": {"threshold": 0.0}}}))
    schedule = load_schedule(path, supernet)
    pipe = DDSMPipeline.from_schedule(path, net)
    images = pipe(batch_size=3, seed=5, output_type="pt").images
    expected = _expected(supernet, schedule, n=3, seed=5)  # its plan: the exit policy with the heads beside it
    assert torch.equal(images, expected)
    static = _expected(supernet, schedule, settings=False, n=3, seed=5)
    assert not torch.equal(images, static), "threshold 0: every image leaves at the smallest depth"


def test_why_diffusers_does_not_import_is_one_line():
    """The reason the plain pipeline stands in for diffusers' is one line: not installed, or the cause
    diffusers wraps (a torchvision for another torch, as on a CPU-only torch)."""
    missing = ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    assert diffusers_failure(missing) == "diffusers is not installed (pip install 'ddsm-search[diffusers]')"
    wrapped = RuntimeError("Failed to import diffusers.pipelines.pipeline_utils because of the following error (look "
                           "up to see its traceback):\nFailed to import ...autoencoder_kl because of the following "
                           "error (look up to see its traceback):\noperator torchvision::nms does not exist")
    why = diffusers_failure(wrapped)
    assert why.startswith("diffusers does not import: operator torchvision::nms does not exist (a torchvision built")
    assert "\n" not in why
