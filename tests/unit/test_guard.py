"""The request guard as a plain ASGI app: keys, body limits (declared and chunked), probes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from models.serving.guard import ConnectionRecycler, RequestGuard, WorkerLoads


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def call(guard: RequestGuard, path: str, headers: dict[str, str], chunks: list[bytes],
         method: str = "POST") -> tuple[int, bytes]:  # fmt: skip
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def make(keys: list[str] | None = None, limit: int = 100) -> RequestGuard:
    return RequestGuard(echo_app, api_keys=keys or [], max_body_bytes=limit, max_in_flight=10)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Basic a2V5MQ=="}, 401),
        ({"Authorization": "Bearer key1"}, 200),
        ({"Authorization": "bearer key2"}, 200),
    ],
)
def test_api_keys(headers: dict[str, str], status: int) -> None:
    got, body = call(make(["key1", "key2"]), "/recommend", headers, [b"{}"])
    assert got == status
    if status == 401:
        assert "Authorization: Bearer" in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("key", "path", "status"),
    [
        ("events1", "/events", 200),
        ("events1", "/recommend", 403),
        ("events1", "/model", 403),
        ("key1", "/events", 200),
        ("key1", "/recommend", 200),
        ("wrong", "/events", 401),
    ],
)
def test_event_keys_may_only_post_events(key: str, path: str, status: int) -> None:
    guard = RequestGuard(echo_app, api_keys=["key1"], max_body_bytes=100, max_in_flight=10, event_keys=["events1"])
    got, body = call(guard, path, {"Authorization": f"Bearer {key}"}, [b"{}"])
    assert got == status
    if status == 403:
        assert "only POST /events" in json.loads(body)["error"]


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz"])
def test_probes_need_no_key(path: str) -> None:
    assert call(make(["key1"]), path, {}, [b""])[0] == 200


@pytest.mark.parametrize(
    ("headers", "chunks", "status"),
    [
        ({"content-length": "101"}, [b"x" * 101], 413),
        ({"content-length": "100"}, [b"x" * 100], 200),
        ({}, [b"x" * 60, b"x" * 60], 413),  # chunked, no declared length
        ({}, [b"x" * 50, b"x" * 50], 200),
    ],
)
def test_body_limit(headers: dict[str, str], chunks: list[bytes], status: int) -> None:
    got, body = call(make(limit=100), "/score", headers, chunks)
    assert got == status
    if status == 200:
        assert body == b"".join(chunks)  # a buffered body is replayed intact
    else:
        assert "over the limit of 100 bytes" in json.loads(body)["error"]


def test_in_flight_bound_comes_before_buffering_a_body() -> None:
    """Slow chunked uploads beyond max_in_flight are refused before any of their body is
    read: memory holds at most max_in_flight bodies."""
    limit, clients = 3, 20
    guard = RequestGuard(echo_app, api_keys=[], max_body_bytes=10_000, max_in_flight=limit)

    async def scenario() -> tuple[list[int], int]:
        release = asyncio.Event()
        reading: set[int] = set()

        async def upload(n: int) -> int:
            chunks = [b"x" * 1000, b"x" * 1000]
            scope = {"type": "http", "method": "POST", "path": "/score", "headers": []}
            status: list[int] = []

            async def receive() -> dict[str, Any]:
                reading.add(n)
                await release.wait()  # a slow client: the rest of its body comes later
                chunk = chunks.pop(0) if chunks else b""
                return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            await guard(scope, receive, send)
            return status[0]

        tasks = [asyncio.create_task(upload(n)) for n in range(clients)]
        for _ in range(50):
            await asyncio.sleep(0)
        buffering = len(reading)
        release.set()
        return list(await asyncio.gather(*tasks)), buffering

    statuses, buffering = asyncio.run(scenario())
    assert buffering == limit, f"{buffering} bodies were being read at once, the bound is {limit}"
    assert sorted(statuses) == [200] * limit + [503] * (clients - limit)


def test_a_503_from_the_service_carries_retry_after() -> None:
    async def unavailable(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "ranking service unavailable"}'})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    guard = RequestGuard(unavailable, api_keys=[], max_body_bytes=100, max_in_flight=10)
    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": [(b"content-length", b"2")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]


@pytest.mark.parametrize(
    ("headers", "chunks", "status"),
    [
        ({"Authorization": "Bearer wrong-key-value"}, [b"{}"], 401),
        ({"Authorization": "Bearer key1", "content-type": "text/plain"}, [b"x"], 415),
        ({"Authorization": "Bearer key1", "content-length": "101"}, [b"x" * 101], 413),
    ],
)
def test_a_refused_request_is_one_warning_line_without_its_key(
    caplog: pytest.LogCaptureFixture, headers: dict[str, str], chunks: list[bytes], status: int
) -> None:
    with caplog.at_level("INFO", logger="recsys.client_errors"):
        got, _ = call(make(["key1"], limit=100), "/recommend", headers, chunks)
    assert got == status
    lines = [r for r in caplog.records if r.name == "recsys.client_errors"]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert lines[0].getMessage().startswith(f"POST /recommend {status}: ")
    assert "wrong-key-value" not in caplog.text and "key1" not in caplog.text


@pytest.mark.parametrize(
    ("path", "status"),
    [("/ui", 200), ("/ui/", 200), ("/ui/api/users", 401), ("/ui/x", 401), ("/uix", 401), ("/recommend", 401)],
)
def test_only_the_exact_public_paths_pass_without_a_key(path: str, status: int) -> None:
    guard = RequestGuard(echo_app, api_keys=["key1"], max_body_bytes=100, max_in_flight=10,
                         public_paths=frozenset({"/ui", "/ui/"}))  # fmt: skip
    assert call(guard, path, {}, [b"{}"])[0] == status


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 200),  # BentoML reads a body without a Content-Type as JSON: so does the guard
        ("application/json", 200),
        ("Application/JSON; charset=utf-8", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/vnd.bentoml+pickle", 415),
    ],
)
def test_only_json_bodies(content_type: str | None, status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    got, body = call(make(), "/recommend", headers, [b'{"user_id": "u1"}'])
    assert got == status
    if status == 415:
        error = json.loads(body)["error"]
        assert f"'{str(content_type).split(';')[0].lower()}'" in error and "application/json" in error
    else:
        assert body == b'{"user_id": "u1"}'


@pytest.mark.parametrize(
    ("admin_keys", "api_keys", "key", "path", "status"),
    [
        (["admin1"], ["key1"], "admin1", "/admin/reload", 200),
        (["admin1"], [], "admin1", "/admin/reload", 200),
        (["admin1"], ["key1"], "key1", "/admin/reload", 401),  # an API key is no admin key
        (["admin1"], [], None, "/admin/reload", 401),  # open API, the admin path still needs its key
        ([], [], "admin1", "/admin/reload", 403),  # no admin keys: the path is off
        (["admin1"], ["key1"], "admin1", "/recommend", 401),  # an admin key is no API key
    ],
)
def test_admin_paths_take_admin_keys_only(admin_keys: list[str], api_keys: list[str], key: str | None,
                                          path: str, status: int) -> None:  # fmt: skip
    guard = RequestGuard(echo_app, api_keys=api_keys, max_body_bytes=100, max_in_flight=10,
                         admin_keys=admin_keys, admin_paths=frozenset({"/admin/reload"}))  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    got, body = call(guard, path, headers, [b"{}"])
    assert got == status, body
    if status == 403:
        assert b"RECSYS_ADMIN_KEYS" in body


@pytest.mark.parametrize("admin_keys", [[], ["admin1"]])
def test_other_methods_of_an_admin_path_go_on_to_the_router(admin_keys: list[str]) -> None:
    """Only POST is an admin call: TRACE, GET... reach the app (whose router answers 405)."""
    guard = RequestGuard(echo_app, api_keys=[], max_body_bytes=100, max_in_flight=10,
                         admin_keys=admin_keys, admin_paths=frozenset({"/admin/reload"}))  # fmt: skip
    got, body = call(guard, "/admin/reload", {}, [b"{}"], method="TRACE")
    assert got == 200 and body == b"{}"


def closes(recycler: ConnectionRecycler, client: tuple[str, int]) -> bool:
    """Whether the recycler's answer to one request from `client` closes the connection."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": [], "client": client}
    asyncio.run(recycler(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 200 and b"".join(m.get("body", b"") for m in sent[1:]) == b"{}"
    return headers.get(b"connection") == b"close"


@pytest.mark.parametrize("max_requests", [1, 3, 50])
def test_a_connection_is_closed_at_its_max_requests_th_answer(max_requests: int) -> None:
    recycler = ConnectionRecycler(echo_app, max_requests=max_requests)
    one, other = ("127.0.0.1", 50001), ("127.0.0.1", 50002)
    answers = [closes(recycler, one) for _ in range(2 * max_requests)]
    assert [i + 1 for i, closed in enumerate(answers) if closed] == [max_requests, 2 * max_requests]
    # Another connection of the same host has its own count.
    assert closes(recycler, other) is (max_requests == 1)


def test_zero_never_closes_and_a_negative_count_is_refused() -> None:
    recycler = ConnectionRecycler(echo_app, max_requests=0)
    assert not any(closes(recycler, ("127.0.0.1", 50001)) for _ in range(200))
    with pytest.raises(ValueError, match="max_requests -1: must be >= 0"):
        ConnectionRecycler(echo_app, max_requests=-1)


def test_the_tracked_connections_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ConnectionRecycler, "MAX_TRACKED", 10)
    recycler = ConnectionRecycler(echo_app, max_requests=5)
    for port in range(100):  # connections that close on their own, each after one request
        closes(recycler, ("127.0.0.1", 40000 + port))
    assert len(recycler._served) <= 10


@pytest.mark.parametrize(("other_in_flight", "own_in_flight", "closed"), [
    (0, 1, 0),    # one request against an idle worker: a difference of 1 is noise
    (0, 4, 1),    # clearly busier: one connection goes, then the interval holds the rest
    (4, 4, 0),    # even
    (8, 11, 1),   # 3 more than 8 (at least 2, or a quarter of the other's load)
    (40, 45, 0),  # 5 more than 40 is within a quarter
])  # fmt: skip
def test_a_clearly_busier_worker_closes_one_connection(tmp_path: Path, other_in_flight: int, own_in_flight: int,
                                                       closed: int) -> None:  # fmt: skip
    path = tmp_path / "loads.bin"
    other = WorkerLoads(path, workers=2, index=1)
    other.set(other_in_flight)
    recycler = ConnectionRecycler(echo_app, max_requests=0, loads=lambda: WorkerLoads(path, 2, 0), shed_interval_s=60)
    release = asyncio.Event()
    seen_by_other: list[int] = []

    async def held_app(scope: Any, receive: Any, send: Any) -> None:
        seen_by_other.append(other.least_of_others())  # this worker's slot, read by the other
        await release.wait()
        await echo_app(scope, receive, send)

    recycler.app = held_app

    async def one(port: int) -> bool:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/score", "headers": [], "client": ("127.0.0.1", port)}
        await recycler(scope, receive, send)
        return dict(sent[0]["headers"]).get(b"connection") == b"close"

    async def main() -> list[bool]:
        tasks = [asyncio.create_task(one(50000 + i)) for i in range(own_in_flight)]
        while len(seen_by_other) < own_in_flight:
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*tasks)

    assert sum(asyncio.run(main())) == closed
    assert seen_by_other == list(range(1, own_in_flight + 1))
    assert other.least_of_others() == 0  # every request done


def test_without_loads_or_with_one_worker_nothing_is_shed(tmp_path: Path) -> None:
    recycler = ConnectionRecycler(echo_app, max_requests=0, loads=lambda: None)
    assert not any(closes(recycler, ("127.0.0.1", 50001)) for _ in range(20))
    with pytest.raises(ValueError, match=r"worker index 2: must be in \[0, 2\)"):
        WorkerLoads(tmp_path / "loads.bin", workers=2, index=2)
