"""The registry over MLflow (the session's embedded SQLite registry under its BENTOML_HOME):
what a training run records, compare-and-swap under concurrent promotions, the lock, fetching
a version the store lacks, and the import of a JSON registry of before. Each test uses its
own model name."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import bentoml
import pytest
from mlflow.exceptions import MlflowException

from models.lifecycle import registry, store
from models.lifecycle.registry import ChampionChanged, RegistryError
from models.lifecycle.store import ModelCheckError
from tests.helpers import small_synthetic
from training import tracking
from training.pipeline import TrainConfig, TrainResult, train


@pytest.fixture(scope="module")
def trained_run() -> TrainResult:
    result = train(small_synthetic(5), TrainConfig(tune_budget_s=0), model_name="rm-run")
    assert result.tag is not None
    return result


def resave(tag: str, name: str) -> str:
    """A new version of `name` with the contents of `tag` (in the store only, unregistered)."""
    version = store.open_version(tag)
    return store.save_version(name, version.load_booster(1), version.load_tables(), version.metadata, {})


def test_a_training_run_records_params_metrics_reports_lineage_and_its_version(trained_run: TrainResult) -> None:
    client = registry.mlflow_client()
    version = registry.find_version(client, str(trained_run.tag))
    assert version is not None and version.run_id
    run = client.get_run(version.run_id)
    meta = trained_run.metadata
    assert run.info.status == "FINISHED" and run.data.tags[registry.TAG_KEY] == trained_run.tag
    for key in ("model", "baseline_popularity", "baseline_cooccurrence"):
        assert run.data.metrics[f"{key}.ndcg"] == pytest.approx(meta["metrics"][key]["ndcg"])
    assert run.data.params["ranker.max_depth"] == str(meta["params"]["ranker"]["max_depth"])
    assert run.data.params["seed"] == str(meta["params"]["seed"])
    lineage = {k: run.data.tags[k] for k in ("dataset_hash", "schema_hash", "code_version")}
    assert lineage == {"dataset_hash": meta["dataset"]["content_hash"], "schema_hash": meta["schema_hash"],
                       "code_version": str(meta["code_version"])}  # fmt: skip
    reports = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert reports == set(tracking.REPORT_FILES)
    assert version.tags["dataset_hash"] == meta["dataset"]["content_hash"]
    assert json.loads(version.tags["metrics"])["model"]["ndcg"] == pytest.approx(meta["metrics"]["model"]["ndcg"])
    curve = client.get_metric_history(run.info.run_id, "validation_ndcg")
    assert len(curve) == len(meta["validation_ndcg_curve"])


def test_a_training_whose_registration_fails_leaves_store_and_registry_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(tag: str, run_id: str | None = None) -> str:
        raise MlflowException("tracking server unreachable")

    monkeypatch.setattr(registry, "register_version", unreachable)
    with pytest.raises(MlflowException, match="unreachable"):
        train(small_synthetic(5), TrainConfig(tune_budget_s=0), model_name="rm-failed")
    monkeypatch.undo()
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.list("rm-failed")  # the name is gone from the store: it had no other version
    client = registry.mlflow_client()
    assert client.search_model_versions("name='rm-failed'") == []
    runs = client.search_runs([registry.experiment_id(client, "rm-failed")])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_two_concurrent_promotions_against_one_champion_swap_once(trained_run: TrainResult) -> None:
    """Two writers judged their versions against the same champion and promote at once: the
    lock makes the compare-and-swap hold, one wins, the other is refused and recorded."""
    base = str(trained_run.tag)
    first = resave(base, "rm-race")
    contenders = [resave(base, "rm-race") for _ in range(2)]
    registry.promote(first)
    barrier = threading.Barrier(len(contenders))
    outcome: dict[str, str] = {}

    def contend(tag: str) -> None:
        barrier.wait()
        try:
            registry.promote(tag, expected_champion=first)
            outcome[tag] = "promoted"
        except ChampionChanged:
            outcome[tag] = "refused"

    threads = [threading.Thread(target=contend, args=(t,)) for t in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcome.values()) == ["promoted", "refused"]
    winner = next(t for t, o in outcome.items() if o == "promoted")
    reg = registry.load("rm-race")
    assert (reg.champion, reg.history) == (winner, [first])
    assert [e["action"] for e in reg.events[-2:]] == ["promote", "promote_refused"]


def test_a_stale_lock_is_broken_a_live_one_waited_for(trained_run: TrainResult, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = resave(str(trained_run.tag), "rm-lock")
    client = registry.mlflow_client()
    lock = f"rm-lock{registry.LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={"owner": "dead", "at": str(time.time() - registry.LOCK_STALE_S - 1)})
    assert registry.promote(tag).champion == tag  # its holder is gone: broken
    client.create_registered_model(lock, tags={"owner": "alive", "at": str(time.time())})
    monkeypatch.setattr(registry, "LOCK_TIMEOUT_S", 0.5)
    try:
        with pytest.raises(RegistryError, match="lock rm-lock.lock was held by another writer"):
            registry.rollback("rm-lock")
    finally:
        client.delete_registered_model(lock)


def test_ensure_local_fetches_a_missing_version_and_checks_it(trained_run: TrainResult) -> None:
    tag = resave(str(trained_run.tag), "rm-fetch")
    registry.promote(tag)
    bentoml.models.delete(tag)  # this machine lacks it now; the registry has it
    with pytest.raises(ModelCheckError, match="not found"):
        store.open_version(tag)
    registry.ensure_local(tag)
    assert store.open_version(tag).tag == tag
    registry.ensure_local(tag)  # present: checked, nothing fetched


def test_ensure_local_refuses_a_damaged_copy_and_leaves_the_store_as_it_was(trained_run: TrainResult) -> None:
    tag = resave(str(trained_run.tag), "rm-damaged")
    registry.promote(tag)
    source = registry.find_version(registry.mlflow_client(), tag)
    assert source is not None and source.source.startswith("file://")
    booster = Path(source.source.removeprefix("file://")) / store.BOOSTER_FILE
    booster.write_bytes(booster.read_bytes()[:-10])
    bentoml.models.delete(tag)
    with pytest.raises(ModelCheckError, match=f"model {tag}: digest check failed: {store.BOOSTER_FILE}"):
        registry.ensure_local(tag)
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get(tag)  # never imported
    with pytest.raises(ModelCheckError, match="neither in the local store nor in the MLflow registry"):
        registry.ensure_local("rm-damaged:nosuchversion")


def test_a_json_registry_of_before_is_imported_once(trained_run: TrainResult) -> None:
    a, b = resave(str(trained_run.tag), "rm-json"), resave(str(trained_run.tag), "rm-json")
    path = registry.registry_path("rm-json")
    path.parent.mkdir(parents=True, exist_ok=True)
    old_events = [{"at": "2026-01-01T00:00:00+00:00", "action": "promote", "stage": "champion", "tag": a}]
    path.write_text(json.dumps({"name": "rm-json", "champion": b, "challenger": None, "history": [a],
                                "events": old_events}))  # fmt: skip
    reg = registry.load("rm-json")
    assert (reg.champion, reg.challenger, reg.history) == (b, None, [a])
    assert reg.events[0] == old_events[0] and reg.events[-1]["action"] == "import"
    assert not path.exists() and path.with_name("rm-json.json.imported").is_file()
    assert bentoml.models.get(b).info.labels["stage"] == "champion"
    assert registry.rollback("rm-json").champion == a  # the imported history works


def test_a_json_registry_naming_a_missing_version_is_refused_with_the_file_and_the_version(
    trained_run: TrainResult,
) -> None:
    path = registry.registry_path("rm-json-missing")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": "rm-json-missing", "champion": "rm-json-missing:gone"}))
    try:
        with pytest.raises(RegistryError, match=f"{path}: cannot import the champion rm-json-missing:gone"):
            registry.load("rm-json-missing")
    finally:
        shutil.move(path, path.with_suffix(".bad"))
