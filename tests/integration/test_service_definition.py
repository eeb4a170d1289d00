"""The service declarations, checked without serving: the guards against the two BentoML
1.4 bugs in ../shared/NOTES.md, and the declared resources as the manifests request them."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import numpy as np
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
