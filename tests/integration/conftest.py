"""The online state's backends under test, behind one fixture: `online_store` is a fresh,
empty store of each backend (a SQLite file in tmp_path; a real redis-server of its own on a
free loopback port), with what the tests need to open it from here or from another process,
to crash it, and to make it unavailable."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.serving.online.base import OnlineLimits, OnlineState
from models.serving.online.redis import RedisState
from models.serving.online.sqlite import SqliteState
from tests.helpers import PROJECT_ROOT, RedisServer, start_redis

BACKENDS = ["sqlite", "redis"]
DEFAULTS: dict[str, Any] = {"max_items": 50, "retention_s": 86400.0, "journal_s": 86400.0, "timeout_s": 2.0}

# A child process opens the same store from a JSON spec (argv[1]) and runs `body` with it.
CHILD_PRELUDE = """
import json, sys
spec = json.loads(sys.argv[1])
from models.serving.online.base import OnlineLimits
limits = OnlineLimits(spec["max_items"], spec["retention_s"], spec["journal_s"], spec["timeout_s"])
if spec["backend"] == "sqlite":
    from models.serving.online.sqlite import SqliteState
    state = SqliteState(spec["path"], limits)
else:
    from models.serving.online.redis import RedisState
    state = RedisState(spec["url"], limits)
from models.serving.events import Event
"""


@dataclass
class StoreUnderTest:
    backend: str
    tmp: Path
    redis: RedisServer | None = None

    def open(self, **overrides: Any) -> OnlineState:
        limits = OnlineLimits(**{**DEFAULTS, **overrides})
        if self.backend == "sqlite":
            return SqliteState(self.tmp / "state.sqlite3", limits)
        assert self.redis is not None
        return RedisState(self.redis.url, limits)

    def spec(self) -> str:
        where = {"path": str(self.tmp / "state.sqlite3")} if self.redis is None else {"url": self.redis.url}
        return json.dumps({"backend": self.backend, **DEFAULTS, **where})

    def child(self, body: str, *args: str) -> subprocess.Popen[str]:
        """A process of its own that opens this store and runs `body` (stdout is a pipe;
        `args` are its sys.argv[2:])."""
        return subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + body, self.spec(), *args], cwd=PROJECT_ROOT,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    def crash_server(self) -> None:
        """kill -9 of the process that holds the data, then a restart on the same data. For
        SQLite that process is the writer itself (the tests kill it); for Redis, the server."""
        if self.redis is not None:
            self.redis.kill()
            self.redis.start()

    @contextlib.contextmanager
    def unavailable(self) -> Iterator[None]:
        """While inside: Redis stopped; SQLite's write lock held by another connection (a
        writer stuck in its transaction). Back to normal on exit."""
        if self.redis is not None:
            self.redis.stop()
            try:
                yield
            finally:
                self.redis.start()
            return
        holder = sqlite3.connect(self.tmp / "state.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()


@pytest.fixture(params=BACKENDS)
def online_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    if request.param == "sqlite":
        yield StoreUnderTest("sqlite", tmp_path)
        return
    server = start_redis(tmp_path / "redis")
    try:
        yield StoreUnderTest("redis", tmp_path, server)
    finally:
        server.stop()


@pytest.fixture
def state(online_store: StoreUnderTest) -> Iterator[OnlineState]:
    opened = online_store.open()
    try:
        yield opened
    finally:
        opened.close()
