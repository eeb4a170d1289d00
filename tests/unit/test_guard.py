"""The request guard as a plain ASGI app: keys, body limits (declared and chunked), probes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from models.serving.guard import RequestGuard


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def call(guard: RequestGuard, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, bytes]:
    scope = {"type": "http", "method": "POST", "path": path,
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
