"""Training end to end in-process: a version in the (temporary) store with its lineage,
tables and report, no pickles, and a store left untouched by a failed run."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import numpy as np
import pytest

from models.core.schema import FEATURE_NAMES, SCHEMA_HASH
from models.lifecycle.store import BOOSTER_FILE, MANIFEST_FILE, ModelCheckError, check_version, open_version
from tests.helpers import small_synthetic
from training.datasets import DataError, synthetic
from training.pipeline import (
    BASELINE_COOC_KEY,
    BASELINE_POP_KEY,
    MODEL_KEY,
    TrainConfig,
    TrainResult,
    train,
)
from training.report import IMPORTANCE_PNG, NDCG_PNG


def store_tags() -> list[str]:
    return sorted(str(m.tag) for m in bentoml.models.list())


def test_version_has_lineage_metadata_and_labels(trained: TrainResult) -> None:
    model = bentoml.models.get(trained.tag)
    meta = model.info.metadata
    assert meta["schema_hash"] == SCHEMA_HASH
    assert [f["name"] for f in meta["feature_schema"]] == list(FEATURE_NAMES)
    assert meta["dataset"]["name"] == "synthetic"
    assert meta["dataset"]["content_hash"] == small_synthetic().content_hash
    assert meta["dataset"]["n_interactions"] > 0
    assert set(meta["metrics"]) >= {MODEL_KEY, BASELINE_POP_KEY, BASELINE_COOC_KEY, "candidate_recall"}
    assert set(meta["versions"]) == {"xgboost", "bentoml", "python"}
    assert meta["code_version"]
    assert meta["params"]["ranker"]["objective"] == "rank:ndcg"
    # Retrieval was chosen on validation, and the version keeps what it chose and measured.
    chosen, candidates = meta["retrieval_selection"]["chosen"], meta["params"]["candidates"]
    assert {k: candidates[k] for k in ("ease_l2", "n_cooc", "n_ease", "n_pop")} == {
        k: chosen[k] for k in ("ease_l2", "n_cooc", "n_ease", "n_pop")
    }
    assert chosen["ease_l2"] in [row["ease_l2"] for row in meta["retrieval_selection"]["lambda"]]
    # The session's model fits the base only (fast_config): one trial, the one it uses.
    assert meta["tuning"]["trials"][meta["tuning"]["chosen_trial"]]["params"] == meta["params"]["ranker"]
    assert model.info.labels["dataset"] == "synthetic"
    assert model.info.labels["schema"] == SCHEMA_HASH


def test_version_folder_holds_open_formats_only(trained: TrainResult) -> None:
    folder = Path(bentoml.models.get(trained.tag).path)
    names = {p.name for p in folder.iterdir()}
    assert {BOOSTER_FILE, MANIFEST_FILE, NDCG_PNG, IMPORTANCE_PNG, "items.parquet", "users.parquet",
            "arrays.npz"} <= names  # fmt: skip
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".joblib"))]
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        assert all(arrays[k].dtype != object for k in arrays.files)
    for png in (NDCG_PNG, IMPORTANCE_PNG):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == names - {MANIFEST_FILE, "model.yaml"}


def test_ranker_beats_both_baselines_on_synthetic(trained: TrainResult) -> None:
    m = trained.metrics
    assert m[MODEL_KEY]["ndcg"] > 1.5 * m[BASELINE_POP_KEY]["ndcg"]
    assert m[MODEL_KEY]["ndcg"] > 1.05 * m[BASELINE_COOC_KEY]["ndcg"]
    assert 0 < m["candidate_recall"] <= 1


def test_every_run_adds_a_version_and_latest_is_the_newest(fast_config: TrainConfig) -> None:
    ds = synthetic(n_users=300, n_items=200, n_interactions=12_000, seed=11)
    first = train(ds, fast_config, model_name="recsys-versions")
    second = train(ds, fast_config, model_name="recsys-versions")
    assert first.tag != second.tag
    tags = [t for t in store_tags() if t.startswith("recsys-versions:")]
    assert sorted(tags) == sorted([first.tag, second.tag])
    assert open_version("recsys-versions:latest").tag == second.tag


@pytest.mark.parametrize(
    "dataset",
    [
        lambda: synthetic(n_users=8, n_items=30, n_interactions=50, seed=1),  # too few users
    ],
    ids=["too small to split"],
)
def test_failed_run_leaves_the_store_as_it_was(dataset, fast_config: TrainConfig) -> None:  # type: ignore[no-untyped-def]
    before = store_tags()
    with pytest.raises(DataError, match="too few labelled users|no user"):
        train(dataset(), fast_config, model_name="recsys-fail")
    assert store_tags() == before


def test_failure_while_saving_leaves_no_version(
    trained: TrainResult, fast_config: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.pipeline as pipeline

    def broken_report(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_report", broken_report)
    before = store_tags()
    with pytest.raises(OSError, match="disk full"):
        train(small_synthetic(), fast_config, model_name="recsys-broken-save")
    assert store_tags() == before


@pytest.mark.parametrize(
    ("damage", "check"),
    [
        (lambda folder: (folder / BOOSTER_FILE).write_bytes(b"garbage"), "digest check failed: ranker.ubj"),
        (lambda folder: (folder / "arrays.npz").unlink(), "file check failed: arrays.npz is missing"),
        (lambda folder: (folder / MANIFEST_FILE).unlink(), "manifest check failed"),
    ],
    ids=["corrupted booster", "missing table", "missing manifest"],
)
def test_damaged_versions_are_refused(
    trained: TrainResult, tmp_path: Path, damage, check: str  # type: ignore[no-untyped-def]
) -> None:
    model = bentoml.models.get(trained.tag)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model.path, copy)
    damage(copy)
    damaged = bentoml.models.Model.from_path(copy)  # type: ignore[attr-defined]
    with pytest.raises(ModelCheckError, match=check) as info:
        check_version(damaged)
    assert trained.tag in str(info.value)


def test_schema_hash_mismatch_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    model = bentoml.models.get(trained.tag)
    model.info.metadata["schema_hash"] = "0000000000000000"
    try:
        with pytest.raises(ModelCheckError, match="schema hash check failed"):
            check_version(model)
    finally:
        model.info.metadata["schema_hash"] = SCHEMA_HASH


def test_missing_model_is_a_clear_error() -> None:
    with pytest.raises(ModelCheckError, match="not found in the BentoML store"):
        open_version("recsys-nothing-here:latest")


KILL_SCRIPT = """
import shutil, sys, time
from pathlib import Path
from tests.helpers import small_synthetic
from training.pipeline import train

real_copytree = shutil.copytree

def copy_then_stall(src, dst, **kwargs):
    # BentoML copies a finished model into a store with copytree: stall right after it,
    # before anything else happens, and wait to be killed there.
    real_copytree(src, dst, **kwargs)
    Path(sys.argv[1]).write_text(str(dst))
    time.sleep(120)

shutil.copytree = copy_then_stall
train(small_synthetic(), model_name="recsys-test")
"""


def test_killed_while_saving_leaves_no_version(trained: TrainResult, bentoml_home: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of saving (after BentoML's copy of the files, before the move
    into the store): no new version, `latest` unchanged, the store still lists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import PROJECT_ROOT

    before = store_tags()
    latest_before = open_version("recsys-test:latest").tag
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(marker)], cwd=PROJECT_ROOT,
                            env={**os.environ, "BENTOML_HOME": str(bentoml_home)})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the training subprocess ended before saving"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        half_written = Path(marker.read_text())
        assert (half_written / BOOSTER_FILE).is_file()  # really in the middle of saving
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert store_tags() == before
    assert open_version("recsys-test:latest").tag == latest_before
