"""The layers of DESIGN.md, enforced: `lint-imports` checks the contracts in pyproject.toml
([tool.importlinter]) on the package as it is installed (drivers/, protocols/ and
sim_instruments/ inside labpnn/, where the package-dir mapping puts them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def staged(tmp_path: Path) -> Path:
    """The package laid out as installed, for import-linter (which walks one folder per package)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.csv", "*.md")
    shutil.copytree(REPO / "labpnn", tmp_path / "labpnn", ignore=ignore)
    for folder in ("drivers", "protocols", "sim_instruments"):
        shutil.copytree(REPO / folder, tmp_path / "labpnn" / folder, ignore=ignore)
    return tmp_path


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), str(REPO / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")
def test_the_layers_hold(tmp_path):
    result = lint(staged(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 kept, 0 broken" in result.stdout


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")
@pytest.mark.parametrize(("module", "line", "contract"), [
    ("labpnn/sessions/crossing.py", "from labpnn.training import trainer\n", "layers"),
    ("labpnn/remote/crossing.py", "import torch\n", "never imports torch"),
    ("labpnn/sim_instruments/crossing.py", "from labpnn.contract import Measurement\n", "stand outside"),
])
def test_a_crossed_layer_fails(tmp_path, module, line, contract):
    root = staged(tmp_path)
    (root / module).write_text(line)
    result = lint(root)
    assert result.returncode != 0
    assert contract in result.stdout and "BROKEN" in result.stdout
