"""Every training run is an MLflow run (in the registry's tracking store, see
models/lifecycle/registry.py): its parameters, the metrics of the model and of each baseline,
the validation curve, the report PNGs, the lineage (dataset name and hash, schema hash, code
version) and the BentoML tag of the version it saved, which becomes an MLflow model version.

A run that fails, or whose version cannot be registered, ends FAILED and leaves the store and
the registry as they were: the version it saved is deleted again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bentoml

from models.lifecycle import registry

log = logging.getLogger(__name__)

REPORT_FILES = ("report_validation_ndcg.png", "report_feature_importance.png")
METRIC_KEYS = ("model", "baseline_popularity", "baseline_cooccurrence")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as one level: {"ranker": {"eta": 0.1}} -> {"ranker.eta": 0.1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_params(metadata: dict[str, Any]) -> dict[str, str]:
    """The run's parameters: the version's `params`, flattened (`ranker.max_depth`, ...)."""
    return {k: json.dumps(v) if isinstance(v, list | tuple) else str(v) for k, v in flatten(metadata["params"]).items()}


def run_metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """`model.ndcg`, `baseline_cooccurrence.recall`, ..., `candidate_recall`, `test_users`."""
    metrics = metadata["metrics"]
    out = {f"{key}.{m}": float(v) for key in METRIC_KEYS for m, v in metrics.get(key, {}).items()
           if isinstance(v, int | float)}  # fmt: skip
    out.update({k: float(v) for k, v in metrics.items() if k not in METRIC_KEYS and isinstance(v, int | float)})
    return out


def lineage_tags(metadata: dict[str, Any]) -> dict[str, str]:
    data = metadata["dataset"]
    tags = {"dataset_name": data.get("name"), "dataset_hash": data.get("content_hash"),
            "dataset_source": data.get("source"), "schema_hash": metadata.get("schema_hash"),
            "code_version": metadata.get("code_version")}  # fmt: skip
    return {k: str(v) for k, v in tags.items() if v is not None}


class TrainingRun:
    """The MLflow run of one training: what `train` logs into it as it goes."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_results(self, metadata: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = registry.mlflow_client()
        now = int(metadata_time_ms(metadata))
        metrics = [Metric(k, v, now, 0) for k, v in run_metrics(metadata).items()]
        curve = metadata.get("validation_ndcg_curve") or []
        metrics += [Metric("validation_ndcg", float(v), now, step) for step, v in enumerate(curve)]
        params = [Param(k, v[:6000]) for k, v in run_params(metadata).items()]
        tags = [RunTag(k, v) for k, v in lineage_tags(metadata).items()]
        for start in range(0, max(len(metrics), len(params), 1), 100):  # MLflow's batch limit: 100 params
            client.log_batch(self.run_id, metrics=metrics[start:start + 100], params=params[start:start + 100],
                             tags=tags if start == 0 else [])  # fmt: skip

    def log_version(self, tag: str, folder: Path) -> None:
        """The saved version: its tag, its report PNGs, and its registration."""
        client = registry.mlflow_client()
        client.set_tag(self.run_id, registry.TAG_KEY, tag)
        for name in REPORT_FILES:
            if (folder / name).is_file():
                client.log_artifact(self.run_id, str(folder / name), "report")
        registry.register_version(tag, self.run_id)


def metadata_time_ms(metadata: dict[str, Any]) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(metadata["created_at"]).timestamp() * 1000


@contextmanager
def training_run(model_name: str, run_name: str) -> Iterator[TrainingRun]:
    """An MLflow run that ends FINISHED if the block does, else FAILED (and re-raises)."""
    client = registry.mlflow_client()
    run = client.create_run(registry.experiment_id(client, model_name), run_name=run_name)
    status = "FAILED"
    try:
        yield TrainingRun(run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


def save_registered(run: TrainingRun, save: Callable[[], str]) -> str:
    """`save()` a version into the store and register it in the run; if the registration
    fails, the version is deleted again (the store as it was) and the error raised."""
    tag = save()
    registered = False
    try:
        run.log_version(tag, Path(bentoml.models.get(tag).path))
        registered = True
    finally:
        if not registered:
            log.error("registering %s in MLflow failed; the version is removed from the store again", tag)
            bentoml.models.delete(tag)
    return tag
