"""The service declarations, checked without serving: the guards against the two BentoML
1.4 bugs in ../shared/NOTES.md, and the settings that shape batching and resources."""

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


@pytest.mark.parametrize("env", [{}, {"RECSYS_RUNNER_MAX_AGE_S": "5", "RECSYS_RUNNER_MAX_REQUESTS": "300"}])
def test_runner_sessions_are_renewed_and_closed_only_when_idle(
    service_module: ModuleType, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """The API's runner sessions are renewed at a bounded age (so that its connections reach
    ranking services added behind one address), and BentoML's session manager is patched to
    close a renewed session once idle (its own closes it with calls in flight: 500s)."""
    from _bentoml_impl.client.proxy2 import SessionManager

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    svc = importlib.reload(service_module)
    conn = svc.RankerService.config["runner_connection"]
    assert conn == {"max_requests": svc.settings.runner_max_requests, "max_age": svc.settings.runner_max_age_s}
    assert conn["max_age"] <= 60
    assert hasattr(SessionManager.get_session, "__wrapped__"), "retire_sessions_when_idle is not applied"


def test_batching_workers_and_resources_come_from_settings(
    service_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_MAX_BATCH_SIZE", "777")
    monkeypatch.setenv("RECSYS_MAX_LATENCY_MS", "55")
    monkeypatch.setenv("RECSYS_RANKER_WORKERS", "2")
    monkeypatch.setenv("RECSYS_RANKER_CPU", "2")
    monkeypatch.setenv("RECSYS_RANKER_MEMORY", "3Gi")
    monkeypatch.setenv("RECSYS_API_WORKERS", "3")
    monkeypatch.setenv("RECSYS_API_CPU", "4")
    svc = importlib.reload(service_module)
    api = svc.RankerService.apis["score"]
    assert (api.max_batch_size, api.max_latency_ms) == (777, 55)
    assert svc.RankerService.config["workers"] == 2
    assert svc.RankerService.config["resources"] == {"cpu": "2", "memory": "3Gi"}
    assert svc.ApiService.config["workers"] == 3
    assert svc.ApiService.config["resources"] == {"cpu": "4", "memory": "1Gi"}
    assert svc.ApiService.dependencies["ranker"].on is svc.RankerService
    assert svc.ApiService.dependencies["ranker"].url is None  # a local ranking service


def test_ranker_urls_make_the_dependency_remote(service_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RANKER_URLS", "http://10.0.0.1:3000/, http://10.0.0.2:3000")
    svc = importlib.reload(service_module)
    assert svc.RANKER_URLS == ["http://10.0.0.1:3000", "http://10.0.0.2:3000"]
    assert svc.ApiService.dependencies["ranker"].url == "http://10.0.0.1:3000"


def test_batching_can_be_switched_off(service_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_BATCHING", "false")
    assert importlib.reload(service_module).RankerService.apis["score"].batchable is False


def test_model_tag_setting_is_used(service_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_MODEL_TAG", "recsys-ranker:abc123")
    svc = importlib.reload(service_module)
    assert [str(m.tag) for m in svc.RankerService.models] == ["recsys-ranker:abc123"]
    assert [str(m.tag) for m in svc.ApiService.models] == ["recsys-ranker:abc123"]


def test_the_page_is_mounted_behind_the_guard_and_built_into_the_bento(service_module: ModuleType) -> None:
    """The guard wraps BentoML's whole app, mounted apps included; only the page's shell is
    public. The page's HTML is no .py file: the Bento's include must name it."""
    from fnmatch import fnmatch
    from pathlib import Path

    import yaml

    from models.serving.guard import RequestGuard
    from models.serving.ui import PAGE_FILE, PUBLIC_PATHS, UI_PATH

    api = service_module.ApiService
    assert [path for _, path, _ in api.mount_apps] == [UI_PATH]
    guards = [options for cls, options in api.middlewares if cls is RequestGuard]
    assert len(guards) == 1 and guards[0]["public_paths"] == PUBLIC_PATHS == {UI_PATH, UI_PATH + "/"}
    root = Path(service_module.__file__).parent
    include = yaml.safe_load((root / "bentofile.yaml").read_text())["include"]
    page = PAGE_FILE.relative_to(root).as_posix()
    assert any(fnmatch(page, pattern) for pattern in include), f"{page} is not in bentofile.yaml's include {include}"
