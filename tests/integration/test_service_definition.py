"""The service declarations, checked without serving: the guards against the two BentoML
1.4 bugs in ../shared/NOTES.md, and the declared resources as the manifests request them."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def service_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """service.py imported afresh under the environment the test sets."""
    import service

    yield importlib.reload(service)
    monkeypatch.undo()
    importlib.reload(service)


def test_batchable_apis_take_numpy_not_dataframes(service_module: ModuleType) -> None:
    """BentoML 1.4's batcher breaks on DataFrame inputs (get_batch_size returns a shape tuple
    and the request hangs): every batchable API must take numpy arrays."""
    batchable = {n: a for n, a in service_module.RankerService.apis.items() if a.batchable}
    assert batchable, "the ranking service must have a batchable scoring API"
    for name, api in batchable.items():
        for field_name, field in api.input_spec.model_fields.items():
            assert field.annotation is np.ndarray, f"{name}.{field_name} is {field.annotation}"
            assert field.annotation is not pd.DataFrame


def test_runner_connections_are_not_recycled_under_load(service_module: ModuleType) -> None:
    """BentoML's default (recycle every 100 requests) dropped in-flight requests (500s)."""
    conn = service_module.RankerService.config["runner_connection"]
    assert conn["max_requests"] >= 1_000_000 and conn["max_age"] >= 86_400


def test_declared_resources_reach_the_manifests(service_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resources each service declares (from settings) are what its Kubernetes
    Deployment requests. Workers and batching limits are checked on real servers
    (tests/e2e/test_settings_e2e.py), the model tag and the remote ranking service too
    (tests/e2e/test_scaling.py)."""
    from deploy.render import render

    for name, value in [("RECSYS_RANKER_CPU", "2"), ("RECSYS_RANKER_MEMORY", "3Gi"), ("RECSYS_API_CPU", "4")]:
        monkeypatch.setenv(name, value)
    importlib.reload(service_module)
    requests = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
                for d in render() if d["kind"] == "Deployment"}  # fmt: skip
    assert requests == {"recsys-ranker": {"cpu": "2", "memory": "3Gi"}, "recsys-api": {"cpu": "4", "memory": "1Gi"}}


def test_ranker_urls_are_trimmed_and_split() -> None:
    from models.serving.settings import RecsysSettings

    urls = RecsysSettings(ranker_urls="http://10.0.0.1:3000/, http://10.0.0.2:3000").ranker_url_list()
    assert urls == ["http://10.0.0.1:3000", "http://10.0.0.2:3000"]
