"""The house in layers (models/__init__.py): the import contracts of pyproject.toml hold on
the tree, and each one fails when a module imports across it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--config", "pyproject.toml", "--no-cache"], cwd=tree,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("models/core/ranking.py", "import bentoml", "models.core is the recommender alone"),
        ("models/core/metrics.py", "import pydantic_settings", "models.core is the recommender alone"),
        ("models/core/tables.py", "from models.lifecycle import store", "models.core is the recommender alone"),
        ("models/lifecycle/store.py", "from models.serving import settings", "Layers"),
        ("models/core/features.py", "from models.serving import guard", "Layers"),
        ("models/serving/guard.py", "import training.split", "Nothing in models imports training"),
        ("models/lifecycle/registry.py", "import service", "Nothing in models imports training"),
        ("training/pipeline.py", "from training import dask_engine", "the pipeline never imports an engine"),
        ("training/replay.py", "import service", "training does not import the service"),
        ("models/serving/guard.py", "import sklearn", "models imports no training-only package"),
        ("models/core/ranking.py", "from tqdm import tqdm", "models imports no training-only package"),
    ],
)
def test_each_contract_fails_on_a_crossing_import(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for name in ("models", "training"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("service.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # crossing on purpose\n")
    result = lint(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), result.stdout
