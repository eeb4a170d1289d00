"""POST /events on a real `bentoml serve` with two API workers and the SQLite online state:
accepted, deduplicated, refused all or nothing; the next /recommend shows the events on
whichever worker answers; and an acknowledged batch survives a `kill -9` of the serve tree,
in the online state and, exported by the service, in the Parquet event log exactly once."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pyarrow.parquet as pq
import pytest

from models.core.recommender import Recommender
from models.lifecycle.store import open_version
from models.serving.online.base import OnlineLimits
from models.serving.online.sqlite import SqliteState
from tests.helpers import PROJECT_ROOT, ServerProcess, poll_until, start_redis, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local(trained: TrainResult) -> Recommender:
    assert trained.tag is not None
    version = open_version(trained.tag)
    return Recommender(version.load_tables(), version.params)


@pytest.fixture(scope="module")
def online_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("online") / "state.sqlite3"


def _serve(trained: TrainResult, bentoml_home: Path, online_path: Path, **env: str) -> ServerProcess:
    assert trained.tag is not None
    return start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag, "RECSYS_API_WORKERS": "2",
        "RECSYS_ONLINE_BACKEND": "sqlite", "RECSYS_ONLINE_PATH": str(online_path),
        "RECSYS_EVENT_LOG_PATH": str(online_path.parent / "event_log"), **env,
    })  # fmt: skip


def _logged_ids(log_root: Path) -> Counter[str]:
    """How often each event id is in the log's files (the reader would drop repeats)."""
    files = sorted((log_root / "events").rglob("*.parquet")) if (log_root / "events").is_dir() else []
    return Counter(i for f in files for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist())


def _state(path: Path) -> SqliteState:
    return SqliteState(path, OnlineLimits(max_items=200, retention_s=1e9, journal_s=1e9, timeout_s=5))


@pytest.fixture(scope="module")
def events_server(trained: TrainResult, bentoml_home: Path, online_path: Path) -> Iterator[ServerProcess]:
    proc = _serve(trained, bentoml_home, online_path)
    try:
        yield proc
    finally:
        proc.stop()


def _event(user: str, item: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "type": "view", **extra}


def _post(server: ServerProcess, events: list[dict[str, Any]]) -> httpx.Response:
    # A new connection per call: keep-alive connections stick to one worker.
    return httpx.post(f"{server.url}/events", json={"events": events}, timeout=30)


def test_events_are_accepted_and_duplicates_counted(events_server: ServerProcess, local: Recommender) -> None:
    items = local.tables.item_ids[:2].tolist()
    batch = [_event("u-dup", items[0]), _event("u-dup", items[1]), _event("u-dup", "not-in-the-catalog")]
    first = _post(events_server, batch)
    assert first.status_code == 200, first.text
    assert first.json() == {"new": 3, "duplicates": 0, "unknown_items": ["not-in-the-catalog"]}
    again = _post(events_server, [batch[0], _event("u-dup", items[1])])
    assert again.json() == {"new": 1, "duplicates": 1, "unknown_items": []}


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        ({"type": "like"}, "type", "view"),
        ({"type": "rating"}, "value", "required"),
        ({"timestamp": 4e12}, "timestamp", "after the server's time"),
        ({"user_id": ""}, "user_id", "at least 1"),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_a_bad_event_is_a_400_naming_index_and_field_and_nothing_is_stored(
    events_server: ServerProcess, local: Recommender, bad: dict[str, Any], field: str, words: str
) -> None:
    item = local.tables.item_ids[0]
    user = f"u-bad-{uuid.uuid4().hex[:8]}"
    batch = [_event(user, item), {**_event(user, item), **bad}]
    got = _post(events_server, batch)
    assert got.status_code == 400, got.text
    detail = got.json()["detail"]
    assert detail[0]["loc"][-2:] == [1, field], detail
    assert words in detail[0]["msg"], detail
    # All or nothing: the good first event was not stored either.
    again = _post(events_server, batch[:1])
    assert again.json()["new"] == 1


def test_the_next_recommendation_shows_the_events_on_any_worker(events_server: ServerProcess, local: Recommender) -> None:
    """A user unknown at training time: after 3 events, every following /recommend (new
    connections, so both workers answer some) is ranked from them, not a fallback."""
    user = f"new-{uuid.uuid4().hex}"
    assert local.user_index(user) is None
    cold = httpx.post(f"{events_server.url}/recommend", json={"user_id": user, "k": 10}, timeout=30).json()
    assert cold["fallback"] is True and cold["history"] == {"trained": 0, "online": 0}
    items = [local.tables.item_ids[i] for i in local.tables.pop_order[:3].tolist()]
    assert _post(events_server, [_event(user, i) for i in items]).json()["new"] == 3
    ids = set()
    for _ in range(8):
        got = httpx.post(f"{events_server.url}/recommend", json={"user_id": user, "k": 10}, timeout=30).json()
        assert got["fallback"] is False, got
        assert got["history"] == {"trained": 0, "online": 3}
        assert not set(items) & {i["item_id"] for i in got["items"]}
        assert any(i["source"] != "popularity" for i in got["items"]), got["items"]
        ids.add(got["recommendation_id"])
    assert len(ids) == 8 and all(len(i) == 32 for i in ids)
    ranked = httpx.post(f"{events_server.url}/rank", json={"user_id": user, "item_ids": items[:2]}, timeout=30).json()
    assert ranked["cold_start"] is False and ranked["history"]["online"] == 3


def test_each_response_is_stored_under_its_recommendation_id(events_server: ServerProcess, online_path: Path) -> None:
    got = httpx.post(f"{events_server.url}/recommend", json={"user_id": "u1", "k": 4}, timeout=30).json()
    state = _state(online_path)
    try:
        # Written off the response path: within a group commit or two.
        stored = poll_until(lambda: state.impression(got["recommendation_id"]), 10, "the impression stored")
    finally:
        state.close()
    assert stored.user_id == "u1" and stored.model_version == got["model_tag"]
    assert list(stored.items) == [i["item_id"] for i in got["items"]] and stored.variant == got["variant"]


def test_sdk_client_sends_events(events_server: ServerProcess, local: Recommender) -> None:
    with bentoml.SyncHTTPClient(events_server.url, timeout=30) as client:
        answer = client.events(events=[_event("u-sdk", local.tables.item_ids[0])])
    assert answer["new"] == 1 and answer["duplicates"] == 0


def test_readiness_reports_the_online_state(events_server: ServerProcess) -> None:
    assert httpx.get(f"{events_server.url}/readyz", timeout=10).status_code == 200


def test_acknowledged_events_survive_kill_9_and_are_logged_exactly_once(
    trained: TrainResult, bentoml_home: Path, local: Recommender, tmp_path: Path
) -> None:
    """The service exports every 0.2 s: a first batch is exported, a second one is killed
    -9 right after its acknowledgement (before, during or after its export); the restarted
    service serves both, and after its graceful stop (its one export) the log holds every
    acknowledged event exactly once."""
    path, log_root = tmp_path / "state.sqlite3", tmp_path / "event_log"
    fast = {"RECSYS_EVENT_LOG_INTERVAL_S": "0.2"}
    server = _serve(trained, bentoml_home, path, **fast)
    user = f"crash-{uuid.uuid4().hex}"
    items = local.tables.item_ids[:100].tolist()
    first, second = [_event(user, i) for i in items[:50]], [_event(user, i) for i in items[50:]]
    try:
        assert _post(server, first).json()["new"] == 50
        poll_until(lambda: _logged_ids(log_root), 30, "the first batch exported",
                   done=lambda ids: set(ids) >= {e["event_id"] for e in first})  # fmt: skip
        assert _post(server, second).json()["new"] == 50
    finally:
        server.kill()
    state = _state(path)
    try:
        assert {r.item_id for r in state.recent(user, 200)} == set(items)
    finally:
        state.close()
    # A restart on the same file serves them, and the same batches are all duplicates. Its
    # rounds are an hour apart: what it logs, its last export at shutdown logs.
    server = _serve(trained, bentoml_home, path, RECSYS_EVENT_LOG_INTERVAL_S="3600")
    third = [_event(f"{user}-after", i) for i in items[:10]]
    try:
        assert _post(server, first + second).json() == {"new": 0, "duplicates": 100, "unknown_items": []}
        got = httpx.post(f"{server.url}/recommend", json={"user_id": user}, timeout=30).json()
        assert got["history"]["online"] == 100
        assert _post(server, third).json()["new"] == 10
    finally:
        assert server.stop() is not None
    logged = _logged_ids(log_root)
    assert set(logged) == {e["event_id"] for e in first + second + third}
    assert max(logged.values()) == 1, [i for i, n in logged.items() if n > 1]


def test_a_stopped_redis_is_a_503_with_retry_after_then_recovers(trained: TrainResult, bentoml_home: Path,
                                                               local: Recommender, tmp_path: Path) -> None:  # fmt: skip
    redis = start_redis(tmp_path / "redis")
    server = _serve(trained, bentoml_home, tmp_path / "unused.sqlite3", RECSYS_ONLINE_BACKEND="redis",
                    RECSYS_REDIS_URL=redis.url, RECSYS_ONLINE_TIMEOUT_S="0.5")  # fmt: skip
    user, items = f"r-{uuid.uuid4().hex}", local.tables.item_ids[:3].tolist()
    try:
        assert _post(server, [_event(user, items[0])]).json()["new"] == 1
        redis.stop()
        down = _post(server, [_event(user, items[1])])
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
        assert "unavailable" in down.json()["error"]
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503
        # A recommendation does not fail for lack of its freshest part: the trained history.
        assert httpx.post(f"{server.url}/recommend", json={"user_id": "u1"}, timeout=30).status_code == 200
        redis = start_redis(tmp_path / "redis", port=redis.port)
        poll_until(lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, 30, "ready again")
        assert _post(server, [_event(user, items[2])]).json()["new"] == 1
        got = httpx.post(f"{server.url}/recommend", json={"user_id": user}, timeout=30).json()
        assert got["history"]["online"] == 2  # the acknowledged ones; the refused one is not there
    finally:
        server.stop()
        redis.stop()


def test_events_are_a_404_when_the_online_state_is_off(trained: TrainResult, bentoml_home: Path, tmp_path: Path) -> None:
    server = _serve(trained, bentoml_home, tmp_path / "unused.sqlite3", RECSYS_ONLINE_BACKEND="off")
    try:
        got = _post(server, [_event("u1", "i1")])
        assert got.status_code == 404 and "RECSYS_ONLINE_BACKEND=off" in got.json()["error"]
        rec = httpx.post(f"{server.url}/recommend", json={"user_id": "u1"}, timeout=30).json()
        assert rec["history"]["online"] == 0 and len(rec["recommendation_id"]) == 32
    finally:
        server.stop()
