"""`python -m training` as a user runs it: a real subprocess, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bentoml
import pandas as pd
import pytest

from tests.helpers import PROJECT_ROOT

SMALL = ["--n-users", "300", "--n-items", "200", "--n-interactions", "12000"]


def run_cli(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=PROJECT_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_trains_and_saves_a_version(bentoml_home: Path) -> None:
    out = run_cli([*SMALL, "--model-name", "recsys-cli", "--json"], bentoml_home)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tag"].startswith("recsys-cli:")
    assert str(bentoml.models.get(result["tag"]).tag) == result["tag"]
    assert "fit ranker" in out.stderr  # staged progress with timings


def test_cli_dry_run_saves_nothing(bentoml_home: Path) -> None:
    out = run_cli([*SMALL, "--model-name", "recsys-cli-dry", "--dry-run"], bentoml_home)
    assert out.returncode == 0, out.stderr
    assert "NDCG@10" in out.stdout and "(dry run: not saved)" in out.stdout
    assert not [m for m in bentoml.models.list() if m.tag.name == "recsys-cli-dry"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "movielens"], "--dataset movielens needs --data PATH"),
        (["--dataset", "movielens", "--data", "/nonexistent"], "/nonexistent: not a directory"),
        (["--dataset", "interactions", "--data", "{bad}", "--time-col", "when"], "missing column 'when'"),
    ],
)
def test_cli_bad_data_exits_2_with_one_line(
    bentoml_home: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_csv(bad, index=False)
    before = sorted(str(m.tag) for m in bentoml.models.list())
    out = run_cli([a.replace("{bad}", str(bad)) for a in args], bentoml_home)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert sorted(str(m.tag) for m in bentoml.models.list()) == before


def test_cli_trains_on_a_generic_file(bentoml_home: Path, tmp_path: Path) -> None:
    """The generic path end to end: a Parquet file with its own column names."""
    from training.datasets import synthetic

    ds = synthetic(n_users=300, n_items=200, n_interactions=12_000, seed=9)
    frame = pd.DataFrame({"who": ds.log.user_ids[ds.log.user], "what": ds.catalog.item_ids[ds.log.item],
                          "when": ds.log.ts})  # fmt: skip
    path = tmp_path / "events.parquet"
    frame.to_parquet(path)
    out = run_cli(["--dataset", "interactions", "--data", str(path), "--user-col", "who",
                   "--item-col", "what", "--time-col", "when", "--dry-run", "--json"], bentoml_home)  # fmt: skip
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["model"]["ndcg"] > metrics["baseline_popularity"]["ndcg"]
