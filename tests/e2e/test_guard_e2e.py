"""The front door on a real server: API keys (on and off), JSON bodies only, the body
limit, and overload answered with a quick 503 instead of a queue that times out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest

from models.core.schema import FEATURE_NAMES
from models.lifecycle.store import open_version
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
KEYS = ("alpha-key-1234567", "beta-key-7654321")
WRONG_KEY = "gamma-not-a-key-000"
EVENT_KEY = "delta-events-only-0042"


@pytest.fixture(scope="module")
def guarded(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    assert trained.tag is not None
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag,
        "RECSYS_API_KEYS": ",".join(KEYS), "RECSYS_EVENT_KEYS": EVENT_KEY,
        "RECSYS_MAX_IN_FLIGHT": "4", "RECSYS_API_WORKERS": "1",
        "RECSYS_ACCESS_LOG": "true",  # to show that the access log does not carry the keys
    })  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


BODY = {"user_id": "u1", "k": 3}


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz"])
def test_probes_need_no_key(guarded: ServerProcess, path: str) -> None:
    assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/recommend", {}),
        ("POST", "/recommend", {"Authorization": f"Bearer {WRONG_KEY}"}),
        ("POST", "/model", {"Authorization": KEYS[0]}),  # no "Bearer "
        ("GET", "/metrics", {}),
        ("GET", "/docs.json", {}),
    ],
)
def test_everything_else_needs_a_valid_key(
    guarded: ServerProcess, method: str, path: str, headers: dict[str, str]
) -> None:
    resp = httpx.request(method, f"{guarded.url}{path}", json=BODY, headers=headers, timeout=10)
    assert resp.status_code == 401
    assert "Authorization: Bearer" in resp.json()["error"]


EVENTS_BODY = {"events": [{"event_id": "guard-e1", "user_id": "u-guard", "item_id": "i1", "type": "click"}]}


@pytest.mark.parametrize(
    ("key", "path", "status"),
    [(None, "/events", 401), (EVENT_KEY, "/events", 200), (KEYS[0], "/events", 200),
     (EVENT_KEY, "/recommend", 403), (EVENT_KEY, "/model", 403), (EVENT_KEY, "/metrics", 403)],
)  # fmt: skip
def test_event_keys_may_only_post_events(guarded: ServerProcess, key: str | None, path: str, status: int) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = EVENTS_BODY if path == "/events" else BODY
    resp = httpx.post(f"{guarded.url}{path}", json=body, headers=headers, timeout=10)
    assert resp.status_code == status, resp.text
    if status == 403:
        assert "only POST /events" in resp.json()["error"]


@pytest.mark.parametrize("key", KEYS)
def test_each_key_works_with_the_sdk_client(guarded: ServerProcess, key: str) -> None:
    with bentoml.SyncHTTPClient(guarded.url, token=key) as client:
        assert len(client.recommend(**BODY)["items"]) == 3
    assert httpx.get(f"{guarded.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).is_success


def test_keys_never_appear_in_logs(guarded: ServerProcess) -> None:
    for key in (*KEYS, WRONG_KEY, EVENT_KEY):
        httpx.post(f"{guarded.url}/recommend", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    log = guarded.log()
    assert "/recommend" in log  # the access log is on, and it does not show the header
    assert not [k for k in (*KEYS, WRONG_KEY, EVENT_KEY) if k in log]


def test_without_keys_no_key_is_needed(server: ServerProcess) -> None:
    assert httpx.post(f"{server.url}/recommend", json=BODY, timeout=10).status_code == 200


def test_a_kept_alive_connection_is_closed_after_its_max_requests(server: ServerProcess) -> None:
    """So that connections spread again over the API workers (guard.ConnectionRecycler);
    the client reconnects by itself and every request is answered."""
    per_connection = RecsysSettings().max_requests_per_connection
    with httpx.Client(timeout=10) as client:
        answers = [client.post(f"{server.url}/recommend", json=BODY) for _ in range(2 * per_connection + 1)]
    assert {r.status_code for r in answers} == {200}
    closed = [i for i, r in enumerate(answers) if r.headers.get("connection") == "close"]
    # The first connection's count may have begun earlier if its port was reused: the gaps tell.
    assert len(closed) >= 2 and all(b - a == per_connection for a, b in zip(closed, closed[1:])), closed


def test_oversized_body_is_a_413(server: ServerProcess) -> None:
    limit = RecsysSettings().max_body_bytes
    body = b'{"user_id": "u1", "pad": "' + b"x" * limit + b'"}'
    resp = httpx.post(f"{server.url}/recommend", content=body,
                      headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert resp.status_code == 413 and "RECSYS_MAX_BODY_BYTES" in resp.json()["error"]


def test_overload_is_a_quick_503_then_service_recovers(guarded: ServerProcess) -> None:
    """Beyond RECSYS_MAX_IN_FLIGHT the API answers 503 at once; no request hangs."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}

    async def burst() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(headers=headers, timeout=30,
                                     limits=httpx.Limits(max_connections=200)) as c:  # fmt: skip
            async def one() -> tuple[int, float, str | None]:
                start = time.monotonic()
                r = await c.post(f"{guarded.url}/recommend", json={"user_id": "u2", "k": 100})
                return r.status_code, time.monotonic() - start, r.headers.get("retry-after")
            return await asyncio.gather(*(one() for _ in range(120)))

    results = asyncio.run(burst())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [(t, ra) for s, t, ra in results if s == 503]
    assert rejected and statuses.count(200) >= 4
    assert all(ra == "1" for _, ra in rejected)
    assert max(t for t, _ in rejected) < 5.0
    resp = httpx.post(f"{guarded.url}/recommend", json=BODY, headers=headers, timeout=10)
    assert resp.status_code == 200


@pytest.fixture(scope="module")
def valid_bodies(trained: TrainResult) -> dict[str, dict[str, object]]:
    """A body each POST API answers 200, by route; every API of ApiService is here."""
    import service

    assert trained.tag is not None
    item = str(open_version(trained.tag).load_tables().item_ids[0])
    bodies: dict[str, dict[str, object]] = {
        "/recommend": BODY, "/rank": {"user_id": "u1", "item_ids": [item]},
        "/score": {"rows": [dict.fromkeys(FEATURE_NAMES, 0.5)]}, "/model": {}, "/drift": {},
        "/events": {"events": [{"event_id": "e-json", "user_id": "u-json", "item_id": item, "type": "view"}]},
        "/admin/reload": {},  # admin keys only: tests/e2e/test_reload_e2e.py, tests/unit/test_guard.py
    }  # fmt: skip
    assert set(bodies) == {api.route for api in service.ApiService.apis.values()}, "a new API: add its body"
    return bodies


ROUTES = ("/recommend", "/rank", "/score", "/model", "/drift", "/events")
# Fields that differ between two answers to the same request.
PER_RESPONSE = ("recommendation_id", "new", "duplicates")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/vnd.bentoml+pickle"],
)  # fmt: skip
def test_a_body_that_is_not_json_is_a_415(
    server: ServerProcess, valid_bodies: dict[str, dict[str, object]], route: str, content_type: str
) -> None:
    resp = httpx.post(f"{server.url}{route}", content=json.dumps(valid_bodies[route]),
                      headers={"content-type": content_type}, timeout=10)  # fmt: skip
    assert resp.status_code == 415, resp.text
    assert "application/json" in resp.json()["error"] and content_type.split(";")[0] in resp.json()["error"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_json_body_without_content_type_is_read_as_json(
    server: ServerProcess, valid_bodies: dict[str, dict[str, object]], route: str
) -> None:
    """BentoML reads a body without a Content-Type as JSON, and the guard lets it through:
    the answer is the one an application/json request gets."""
    body = json.dumps(valid_bodies[route])
    bare = httpx.post(f"{server.url}{route}", content=body, timeout=10)
    assert "content-type" not in bare.request.headers
    typed = httpx.post(f"{server.url}{route}", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert (bare.status_code, typed.status_code) == (200, 200), (bare.text, typed.text)
    if route != "/drift":  # the drift counts move with every request
        def same(answer: dict[str, object]) -> dict[str, object]:
            return {k: v for k, v in answer.items() if k not in PER_RESPONSE}

        assert same(bare.json()) == same(typed.json())
