"""The API's front door, as one pure ASGI middleware: optional API keys, JSON bodies only,
a request-body size limit, and a bound on requests in flight (503 at once rather than a queue that times
out). Health and readiness probes always pass, so orchestrators can probe without a key.
"""

from __future__ import annotations

import hmac
import json
import logging
import mmap
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBE_PATHS = frozenset({"/healthz", "/livez", "/readyz"})


# The same logger as BentoML's 400s (models/serving/bentoml_patches.py): a client's error is
# one WARNING line that names the request and the rule, never a value or a key.
_client_log = logging.getLogger("recsys.client_errors")


async def _refuse(send: Send, scope: Scope, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    _client_log.warning("%s %s %d: %s", scope.get("method"), scope.get("path"), status, _RULES[status])
    await _reply(send, status, error, headers)


_RULES = {401: "missing or invalid API key", 403: "event key outside POST /events, or an admin path without RECSYS_ADMIN_KEYS",
          413: "body over RECSYS_MAX_BODY_BYTES", 415: "not JSON"}


async def _reply(send: Send, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _retry_after_on_503(send: Send) -> Send:
    """A 503 from the service (no ranking service could answer) tells the client when to
    retry, like the guard's own."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 503:
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"retry-after" for name, _ in headers):
                message = {**message, "headers": [*headers, (b"retry-after", b"1")]}
        await send(message)

    return sending


def _allowing_get(send: Send) -> Send:
    """A 405 of a read-only route lists GET beside BentoML's POST in its Allow header."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 405:
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
            message = {**message, "headers": [*headers, (b"allow", b"GET, POST")]}
        await send(message)

    return sending


class RequestGuard:
    """401 without a valid `Authorization: Bearer <key>` (when keys are set; `public_paths`
    excepted), 403 for an event key outside POST `event_paths`, 415 for a body that is not JSON, 413 for bodies over `max_body_bytes`, 503
    when `max_in_flight` requests are already being served, and Retry-After on every 503."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int, max_in_flight: int,
                 read_only_paths: frozenset[str] = frozenset(),
                 public_paths: frozenset[str] = frozenset(),
                 event_keys: list[str] | None = None,
                 event_paths: frozenset[str] = frozenset({"/events"}),
                 admin_keys: list[str] | None = None,
                 admin_paths: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.app = app
        # `admin_paths` take admin keys only (RECSYS_ADMIN_KEYS), and no API key; without
        # admin keys they are refused (403): an open reload trigger would be a way to load the
        # store on every request.
        self._admin_keys = [k.encode() for k in admin_keys or []]
        self.admin_paths = admin_paths
        # Keys that may only POST to `event_paths` (RECSYS_EVENT_KEYS): a front end that
        # reports clicks holds one, and cannot read recommendations or models with it.
        self._event_keys = [k.encode() for k in event_keys or []]
        self.event_paths = event_paths
        # APIs that read and change nothing answer GET too: BentoML routes APIs as POST only,
        # so a GET there is passed on as a POST with no body.
        self.read_only_paths = read_only_paths
        self._keys = [k.encode() for k in api_keys]
        # Exact paths served without a key (the /ui page's HTML shell, which holds no data).
        self.public_paths = public_paths
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self._in_flight = 0

    @staticmethod
    def _bearer(scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return bytes(value[7:].strip())
        return None

    def _admin(self, scope: Scope) -> int | None:
        if not self._admin_keys:
            return 403
        given = self._bearer(scope)
        if given is None:
            return 401
        matches = [hmac.compare_digest(given, key) for key in self._admin_keys]  # every key: constant time
        return None if any(matches) else 401

    def _is_admin_call(self, scope: Scope) -> bool:
        # Admin routes are POST only: any other method goes on to the router's 405.
        return scope["path"] in self.admin_paths and scope.get("method") == "POST"

    def _authorized(self, scope: Scope) -> int | None:
        """None if the request may pass, else the status to refuse it with (401, 403)."""
        if self._is_admin_call(scope):
            return self._admin(scope)
        if not self._keys or scope["path"] in self.public_paths:
            return None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
                # compare_digest against every key (a list, not a short-circuit): the time
                # taken says nothing about a key.
                api = [hmac.compare_digest(given, key) for key in self._keys]
                event = [hmac.compare_digest(given, key) for key in self._event_keys]
                if any(api):
                    return None
                if any(event):
                    events = scope["path"] in self.event_paths and scope.get("method") == "POST"
                    return None if events else 403
                return 401
        return 401

    @staticmethod
    def _content_type(scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"content-type":
                return bytes(value.split(b";")[0].strip().lower())
        return None

    def _declared_length(self, scope: Scope) -> int | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.read_only_paths:
            send = _allowing_get(send)
            if scope.get("method") == "GET":
                scope = {**scope, "method": "POST"}
        refused = self._authorized(scope)
        if refused == 403 and self._is_admin_call(scope):
            await _refuse(send, scope, 403, f"{scope['path']} is off: set RECSYS_ADMIN_KEYS and send "
                          "'Authorization: Bearer <admin key>'")  # fmt: skip
            return
        if refused == 403:
            await _refuse(send, scope, 403, "this key may only POST /events (RECSYS_EVENT_KEYS)")
            return
        if refused is not None:
            await _refuse(send, scope, 401, "missing or invalid API key; send the header "
                         "'Authorization: Bearer <key>'", {"www-authenticate": "Bearer"})  # fmt: skip
            return
        content_type = self._content_type(scope)
        if content_type not in (None, b"application/json"):
            # BentoML answers other types (multipart, form) with a 500; JSON is all we take.
            await _refuse(send, scope, 415, f"Content-Type {content_type.decode(errors='replace')!r} is not "
                         "supported; send application/json")  # fmt: skip
            return
        declared = self._declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _refuse(send, scope, 413, f"request body of {declared} bytes is over the limit of "
                         f"{self.max_body_bytes} bytes (RECSYS_MAX_BODY_BYTES)")  # fmt: skip
            return
        # The in-flight bound before any buffering: a body is only read into memory for a
        # request that holds a place, so memory stays within max_in_flight bodies.
        if self._in_flight >= self.max_in_flight:
            await _reply(send, 503, f"overloaded: {self._in_flight} requests in flight in this worker "
                         "(RECSYS_MAX_IN_FLIGHT); retry later", {"retry-after": "1"})  # fmt: skip
            return
        self._in_flight += 1
        try:
            if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                receive, too_large = await self._buffer_body(receive)
                if too_large:
                    await _refuse(send, scope, 413, f"request body is over the limit of {self.max_body_bytes} "
                                 "bytes (RECSYS_MAX_BODY_BYTES)")  # fmt: skip
                    return
            await self.app(scope, receive, _retry_after_on_503(send))
        finally:
            self._in_flight -= 1

    async def _buffer_body(self, receive: Receive) -> tuple[Receive, bool]:
        """Read a body of unknown length (chunked) up to the limit, then replay it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return receive, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, False


class WorkerLoads:
    """Requests in flight per worker of one service of one serve process, in a small shared
    file (one int32 slot per worker): each worker writes its own slot and reads the others'.
    An aligned 4-byte store is atomic, so a reader sees each slot's old or new value."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index}: must be in [0, {workers})")
        size = 4 * workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("i")
        self.index = index

    def set(self, in_flight: int) -> None:
        self._slots[self.index] = in_flight

    def least_of_others(self) -> int:
        return min(v for i, v in enumerate(self._slots) if i != self.index)


class ConnectionRecycler:
    """Answers with `Connection: close` a kept-alive connection's `max_requests`-th request
    (0: never), as nginx's keepalive_requests does, and, given the other workers' loads
    (`loads`), a request of a worker that has clearly more in flight than the least busy
    other one (at most one every `shed_interval_s`).

    The API workers share one listening socket and a connection stays with the worker that
    accepted it: 64 connections opened at once often landed mostly on one worker (54 of 64,
    all 64), which then did ~88% of the work while the other core idled, for as long as the
    connections lived. A client that reconnects is accepted by whichever worker is free to
    accept first, the less busy one. Closing every 50th request spread them (the busier
    worker's share at most 0.66 over 20 servers of bench/events_http.py, 0.88-0.89 on 2 of 5
    before), but each reconnection costs both ends: at 16 clients of 1-row /score the
    workers still split 38/53% or 39/69% of a core. Closing where the load is uneven, and
    only there, evens it without reconnecting balanced clients."""

    MAX_TRACKED = 65_536  # connections that closed on their own leave an entry; then start over

    def __init__(self, app: ASGIApp, max_requests: int, loads: Callable[[], WorkerLoads | None] | None = None,
                 shed_interval_s: float = 0.02) -> None:  # fmt: skip
        if max_requests < 0:
            raise ValueError(f"max_requests {max_requests}: must be >= 0 (0: never close)")
        self.app = app
        self.max_requests = max_requests
        self.shed_interval_s = shed_interval_s
        self._served: dict[Any, int] = {}  # requests so far per (client host, port) of this worker
        self._open_loads = loads
        self._loads: WorkerLoads | None = None
        self._in_flight = 0
        self._last_shed = 0.0

    def _shed(self) -> bool:
        """Whether this worker is clearly busier than the least busy other one (at most
        one connection every shed_interval_s)."""
        if self._loads is None:
            return False
        least = self._loads.least_of_others()
        if self._in_flight - least < max(2, least // 4):
            return False
        now = time.monotonic()
        if now - self._last_shed < self.shed_interval_s:
            return False
        self._last_shed = now
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or client is None or not (self.max_requests or self._open_loads or self._loads):
            await self.app(scope, receive, send)
            return
        if self._open_loads is not None:  # opened in the worker (after the fork), on its first request
            self._loads, self._open_loads = self._open_loads(), None
        key = tuple(client)
        served = self._served.pop(key, 0) + 1
        self._in_flight += 1
        try:
            if self._loads is not None:
                self._loads.set(self._in_flight)
            if (not self.max_requests or served < self.max_requests) and not self._shed():
                if len(self._served) >= self.MAX_TRACKED:
                    self._served.clear()
                self._served[key] = served
                await self.app(scope, receive, send)
                return
            await self.app(scope, receive, _closing(send))
        finally:
            self._in_flight -= 1
            if self._loads is not None:
                self._loads.set(self._in_flight)


def _closing(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return sending


class TokenGuard:
    """The ranking service's door: every request but the probes and /metrics needs
    `Authorization: Bearer <token>`, the internal token the API services send. Without it,
    anything that can reach the ranking service's port could have it score."""

    OPEN_PATHS = PROBE_PATHS | {"/metrics"}

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("TokenGuard needs a non-empty token (RECSYS_RANKER_TOKEN)")
        self.app = app
        self._expected = b"bearer " + token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            if not hmac.compare_digest(given[:7].lower() + given[7:].strip(), self._expected):
                await _refuse(send, scope, 401, "the ranking service needs the internal token "
                             "('Authorization: Bearer <RECSYS_RANKER_TOKEN>')", {"www-authenticate": "Bearer"})  # fmt: skip
                return
        await self.app(scope, receive, send)
