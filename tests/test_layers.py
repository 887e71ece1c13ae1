"""The import rules of pyproject.toml hold (`lint-imports`), and they are not empty words: a core module
that imports a method, or one family that imports another, breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (the dev extra)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with the project's contracts on the ddsm_search package found in `root`."""
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          timeout=300)


def test_the_house_keeps_its_import_rules():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("where,line,contract", [
    ("sampling/generation.py", "from ..methods.early_exit import policy", "the core imports no method"),
    ("methods/sparsity/plugin.py", "from ..early_exit import policy", "method families are independent"),
    ("search/loop.py", "from ..methods.step_groups import groups", "stages of the flow name no method"),
    ("space/steps.py", "from ..sampling import plan", "layers"),
])
def test_a_broken_rule_fails_the_lint(tmp_path, where, line, contract):
    shutil.copytree(ROOT / "ddsm_search", tmp_path / "ddsm_search", ignore=shutil.ignore_patterns("__pycache__"))
    module = tmp_path / "ddsm_search" / where
    module.write_text(module.read_text() + f"\n{line}  # a mutation: this import breaks a rule\n")
    done = _lint(tmp_path)
    assert done.returncode != 0, done.stdout
    broken = [row for row in done.stdout.splitlines() if "BROKEN" in row]
    assert any(row.startswith(contract) for row in broken), done.stdout
