"""What a user gets from `pip install`: the wheel carries the experiment configs, the LICENSE and py.typed,
and works from an empty folder in a fresh virtual environment (help, the configs by name, a few training
steps of a shipped config); diffusers imports beside ddsm_search (no torchvision that cannot load)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pip output that says the package index could not be reached: a reason outside the code
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Could not fetch URL",
           "Network is unreachable", "No matching distribution found for setuptools")
IGNORED = shutil.ignore_patterns(".git", ".venv", "results", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache")


def _pip(python: Path | str, *args: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _skip_if_offline(done: subprocess.CompletedProcess, what: str) -> None:
    output = done.stdout + done.stderr
    if done.returncode != 0 and any(sign in output for sign in OFFLINE):
        pytest.skip(f"{what}: the package index cannot be reached ({output.strip().splitlines()[-1]})")
    assert done.returncode == 0, f"{what} failed:\n{output[-4000:]}"


def test_the_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)  # a clean checkout: nothing built in the developer's tree
    dist = tmp_path / "dist"
    _skip_if_offline(_pip(sys.executable, "wheel", "--no-deps", "-q", "-w", str(dist), str(source), cwd=tmp_path,
                          timeout=600), "building the wheel")
    (wheel,) = dist.glob("ddsm_search-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("ddsm_search/search_spaces/"))
    assert shipped == sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert "ddsm_search/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith("tests/")], "tests are not installed"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, cli = venv / "bin" / "python", venv / "bin" / "ddsm-search"
    _skip_if_offline(_pip(python, "install", "-q", "-c", str(ROOT / "constraints-cpu.txt"), f"{wheel}[diffusers]",
                          cwd=tmp_path, timeout=1200), "installing the wheel")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", DDSM_SEARCH_CACHE=str(tmp_path / "cache"))

    def run(*args: str, timeout: int = 300) -> str:
        done = subprocess.run([str(cli), *args], cwd=empty, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ddsm-search {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done.stdout

    assert "--max-loss" in run("quickstart", "--help")
    listed = run("configs")
    assert all(name in listed for name in ("digits", "digits-dit", "cifar10")), listed
    assert run("configs", "show", "digits").startswith("# The embedded default")
    run("train", "digits", "--train-steps", "2", "--out", "net", "--quiet", "--device", "cpu", timeout=600)
    assert (empty / "net" / "meta.json").is_file() and (empty / "net" / "samples" / "width-0.25.png").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["net"], "nothing else is written in the working folder"
    # the install brings no torchvision, so the user's own diffusers imports work beside ddsm-search
    code = "import ddsm_search.cli.main, importlib.util; from diffusers import DiffusionPipeline; " \
           "print(importlib.util.find_spec('torchvision') is None)"
    done = subprocess.run([str(python), "-c", code], cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-4000:]


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (its extra)")
def test_diffusers_imports_beside_ddsm_search():
    """A user's `from diffusers import DiffusionPipeline` works in the environment ddsm-search is installed in,
    after ddsm_search and its diffusers importer are imported (no private flag of diffusers is patched)."""
    code = ("import ddsm_search, ddsm_search.methods.pretrained.diffusers_config as c\n"
            "c.unet2d_class()\n"
            "import diffusers.utils.import_utils as u\n"
            "from diffusers import DiffusionPipeline\n"
            "print(u.is_torchvision_available() == (importlib.util.find_spec('torchvision') is not None))\n")
    done = subprocess.run([sys.executable, "-c", "import importlib.util\n" + code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True", "diffusers' own view of torchvision must be left as it is"
