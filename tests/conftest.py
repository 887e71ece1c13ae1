"""Shared fixtures: a tiny experiment that trains in seconds on CPU."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from ddsm_search.config import config_from_dict

TINY = {
    "name": "tiny",
    "data": {"kind": "digits"},
    "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
              "group_size": 2, "head_dim": 4, "widths": [1.0, 0.75, 0.5]},
    "diffusion": {"timesteps": 100},
    "train": {"steps": 6, "batch_size": 16, "lr": 0.002, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 1},
    "sample": {"steps": 5, "grid_size": 4},
}


def pytest_configure(config):
    """Keep the suite's caches (reference statistics, full-size samples, backend timings, the built
    kernel) in a folder of its own, not in the user's ~/.cache."""
    os.environ.setdefault("DDSM_SEARCH_CACHE", tempfile.mkdtemp(prefix="ddsm-search-tests-"))


def tiny_dict(**sections) -> dict:
    """Return the tiny experiment as plain data, with sections updated from keyword arguments."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.fixture
def tiny_cfg():
    """The tiny experiment config."""
    return config_from_dict(tiny_dict())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny networks: on a shared 2-core machine two threads made
    their forward passes and training steps up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_supernet(tmp_path_factory):
    """A tiny supernet trained once per session through the CLI; tests only read it."""
    import yaml

    from ddsm_search.cli.main import main

    root = tmp_path_factory.mktemp("tiny-supernet")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict()))
    assert main(["train", str(config), "--out", str(root / "net"), "--train-steps", "3", "--quiet", "--device", "cpu"]) == 0
    return root / "net"
