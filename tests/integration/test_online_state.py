"""The online state's contract, run against each backend (a SQLite file; a real
redis-server): idempotent durable writes, recent items by event time and capped, impressions,
the journal, retention, crashes, a full backend, and one that is gone and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.serving.events import MAX_ID_CHARS, Event, Impression
from models.serving.online import BufferedWriter, GroupCommitWriter, make_state
from models.serving.online.base import START, BackendUnavailable, OnlineLimits, OnlineState, RecentItem
from models.serving.online.redis import RedisState
from models.serving.online.sqlite import SqliteState
from models.serving.settings import RecsysSettings
from tests.helpers import free_port
from tests.integration.conftest import DEFAULTS, StoreUnderTest


def ev(event_id: str, user: str = "u1", item: str = "i1", ts: float = 1000.0, type_: str = "view") -> Event:
    return Event(event_id, user, item, type_, ts)  # type: ignore[arg-type]


def journal(state: OnlineState) -> list[Event]:
    events, cursor = [], START
    while True:
        page, cursor = state.export_events(cursor, 7)  # small pages: the cursor is exercised
        if not page:
            return events
        events += page


def test_a_seen_id_is_a_duplicate_within_a_batch_and_across_batches(state: OnlineState) -> None:
    first = state.write_events([ev("a", item="x", ts=1), ev("b", item="y", ts=2), ev("a", item="z", ts=3)])
    assert first.new == (True, True, False) and (first.n_new, first.n_duplicate) == (2, 1)
    second = state.write_events([ev("a", item="w", ts=9), ev("c", item="v", ts=4)])
    assert second.new == (False, True)
    # The duplicates changed nothing: neither the user's items nor the journal.
    assert [r.item_id for r in state.recent("u1", 10)] == ["v", "y", "x"]
    assert [(e.event_id, e.item_id) for e in journal(state)] == [("a", "x"), ("b", "y"), ("c", "v")]


WRITE_300 = """
order = list(range(300)) if sys.argv[2] == "up" else list(range(299, -1, -1))
new = 0
for start in range(0, 300, 10):
    new += state.write_events([Event(f"e{i}", f"u{i % 7}", f"i{i}", "click", 1000.0 + i)
                               for i in order[start:start + 10]]).n_new
print(new)
"""


def test_two_processes_writing_the_same_ids_at_once_store_each_once(online_store: StoreUnderTest) -> None:
    # Both write the same 300 ids in batches of 10 at the same time, in opposite orders.
    procs = [online_store.child(WRITE_300, direction) for direction in ("up", "down")]
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(counts) == 300, f"new events per writer: {counts}"
    state = online_store.open()
    try:
        assert sorted(e.event_id for e in journal(state)) == sorted(f"e{i}" for i in range(300))
        assert sum(len(state.recent(f"u{u}", 1000)) for u in range(7)) == 300
    finally:
        state.close()


def test_recent_items_are_newest_by_event_time_first_and_capped(online_store: StoreUnderTest) -> None:
    state = online_store.open(max_items=5)
    try:
        # Arrival order is not time order: recent follows the timestamps.
        times = [700, 100, 800, 300, 200, 600, 500, 400]
        for n, ts in enumerate(times):
            state.write_events([ev(f"e{n}", item=f"i{ts}", ts=ts)])
        assert state.recent("u1", 10) == [RecentItem(f"i{t}", float(t), "view") for t in (800, 700, 600, 500, 400)]
        assert [r.item_id for r in state.recent("u1", 2)] == ["i800", "i700"]
        # An older event for a kept (item, type) does not move it back; a newer one moves it up.
        state.write_events([ev("old", item="i700", ts=50), ev("new", item="i400", ts=900)])
        assert [(r.item_id, r.timestamp) for r in state.recent("u1", 3)] == [
            ("i400", 900.0), ("i800", 800.0), ("i700", 700.0)]  # fmt: skip
        # Another type of the same item is an entry of its own.
        state.write_events([ev("buy", item="i800", ts=950, type_="purchase")])
        assert state.recent("u1", 2) == [RecentItem("i800", 950.0, "purchase"), RecentItem("i400", 900.0, "view")]
        many = state.recent_many(["u1", "nobody", "u1"], 1)
        assert many == {"u1": [RecentItem("i800", 950.0, "purchase")], "nobody": []}
    finally:
        state.close()


# Ids at the length limit, in characters: 4-byte characters, a separator the Redis member
# uses (':'), spaces, a newline, quotes, a glob character.
LONG_IDS = ["🎬" * MAX_ID_CHARS, "type:view:" + "é" * (MAX_ID_CHARS - 10), 'a "b"\n\tc* [d]?', "用户:" * 85]


@pytest.mark.parametrize("text", LONG_IDS, ids=["emoji", "colons", "whitespace", "cjk"])
def test_unicode_and_long_ids_round_trip(state: OnlineState, text: str) -> None:
    assert len(text) <= MAX_ID_CHARS
    event = Event(event_id=text, user_id=text, item_id=text, type="rating", timestamp=1234.5, value=4.5,
                  recommendation_id=text)  # fmt: skip
    assert state.write_events([event]).new == (True,)
    assert state.write_events([event]).new == (False,)
    assert state.recent(text, 5) == [RecentItem(text, 1234.5, "rating")]
    assert journal(state) == [event]
    shown = Impression(text, text, (text, "plain"), "v1", "champion", 1234.5)
    assert state.write_impression(shown) and state.impression(text) == shown


def test_impressions_round_trip_once(state: OnlineState) -> None:
    shown = Impression("r1", "u1", ("i3", "i1", "i2"), "recsys-ranker:abc", "challenger", 1700000000.25)
    assert state.write_impression(shown) is True
    # A repeated id changes nothing.
    assert state.write_impression(Impression("r1", "u2", ("x",), "v0", "champion", 1.0)) is False
    assert state.impression("r1") == shown
    assert state.impression("unknown") is None
    second = Impression("r2", "u1", (), "recsys-ranker:abc", "fallback", 1700000001.0)
    state.write_impression(second)
    page, cursor = state.export_impressions(START, 1)
    assert page == [shown]
    assert state.export_impressions(cursor, 10)[0] == [second]


def test_impressions_in_a_batch(state: OnlineState) -> None:
    shown = [Impression(f"r{i % 3}", "u1", (f"i{i}",), "v1", "champion", 1000.0 + i) for i in range(4)]
    assert state.write_impressions(shown).new == (True, True, True, False)  # r0 again: a duplicate
    assert state.impression("r0") == shown[0]
    assert len(state.export_impressions(START, 1000)[0]) == 3


def test_a_buffered_writer_joins_entries_that_arrive_apart_bounds_them_and_writes_all_at_close(state: OnlineState) -> None:
    """Impressions one at a time, 2 ms apart (responses of a loaded worker): a writer that
    lingers 200 ms commits them together; beyond max_pending it refuses; close() still
    writes what it holds (a failed write's count: test_realtime.py, failed impressions)."""
    lost: list[tuple[str, int]] = []
    writer = BufferedWriter(state, max_events=1000, linger_s=0.2, max_pending=12,
                            on_error=lambda err, n: lost.append((type(err).__name__, n)))  # fmt: skip
    try:
        for i in range(10):
            assert writer.add(Impression(f"l{i}", "u3", ("a",), "v1", "champion", 1.0))
            time.sleep(0.002)
        deadline = time.monotonic() + 10
        while writer.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.pending == 0 and writer.commits <= 2, writer.commits
        assert all(state.impression(f"l{i}") is not None for i in range(10))
        assert all(writer.add(Impression(f"m{i}", "u3", ("a",), "v1", "champion", 1.0)) for i in range(12))
        assert writer.add(Impression("over", "u3", ("a",), "v1", "champion", 1.0)) is False
    finally:
        writer.close()
    assert state.impression("m11") is not None and state.impression("over") is None and lost == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(Impression("late", "u3", ("a",), "v1", "champion", 1.0))
    with pytest.raises(ValueError, match="linger_s"):
        BufferedWriter(state, max_events=1000, linger_s=-1, max_pending=1, on_error=lambda err, n: None)


def test_retention_drops_old_user_state_and_only_exported_old_journal_entries(online_store: StoreUnderTest) -> None:
    retention, journal_s = 1000.0, 100.0
    state = online_store.open(retention_s=retention, journal_s=journal_s)
    try:
        now = time.time()
        state.write_events([ev("old", item="a", ts=now - 2 * retention), ev("fresh", item="b", ts=now - 10),
                            ev("other", user="u2", item="c", ts=now - 2 * retention)])  # fmt: skip
        _, after_two = state.export_events(START, 2)
        state.mark_exported("events", after_two)
        dropped = state.expire(now)
        # Per user, by event time and retention_s: the old entries go, the fresh one stays.
        assert dropped.recent_items == 2
        assert state.recent("u1", 10) == [RecentItem("b", now - 10, "view")] and state.recent("u2", 10) == []
        # The journal was received just now: nothing is older than journal_s yet.
        assert dropped.events == 0 and len(journal(state)) == 3
        # Later, received before now - journal_s: the exported entries go, the unexported one
        # stays; the fresh user entry is still within retention_s.
        later = state.expire(now + 2 * journal_s)
        assert later.events == 2 and later.recent_items == 0
        assert [e.event_id for e in journal(state)] == ["other"]
        assert [r.item_id for r in state.recent("u1", 10)] == ["b"]
    finally:
        state.close()


def test_redis_down_at_start_is_reported_by_health_not_by_failing_to_open() -> None:
    state = RedisState(f"redis://127.0.0.1:{free_port()}/0", OnlineLimits(10, 100.0, 100.0, 0.3))
    try:
        with pytest.raises(BackendUnavailable, match="redis"):
            state.health()
        with pytest.raises(BackendUnavailable):
            state.write_events([ev("e")])
    finally:
        state.close()


KILLED_WRITER = """
import time
result = state.write_events([Event(f"k{i}", "u1", f"i{i}", "purchase", 1000.0 + i) for i in range(100)])
print(result.n_new, flush=True)
time.sleep(600)
"""


def test_acknowledged_events_survive_kill_9(online_store: StoreUnderTest) -> None:
    """The writer is SIGKILLed right after write_events returned, and (Redis) so is the
    server, restarted on the same data: every acknowledged event is there. (A power loss
    cannot be simulated here; synchronous=FULL and appendfsync always are for that.)"""
    writer = online_store.child(KILLED_WRITER)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "100"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdout.close()
    online_store.crash_server()
    state = online_store.open()
    try:
        assert [e.event_id for e in journal(state)] == [f"k{i}" for i in range(100)]
        kept = DEFAULTS["max_items"]
        assert [r.item_id for r in state.recent("u1", 1000)] == [f"i{i}" for i in range(99, 99 - kept, -1)]
        # The ids are remembered too: a retry after the crash is a duplicate.
        assert state.write_events([Event("k5", "u1", "i5", "purchase", 1005.0)]).new == (False,)
    finally:
        state.close()


def test_a_backend_gone_is_unavailable_and_writes_succeed_when_it_is_back(online_store: StoreUnderTest) -> None:
    timeout = 0.5
    state = online_store.open(timeout_s=timeout)
    try:
        state.write_events([ev("before")])
        with online_store.unavailable():
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                state.write_events([ev("during"), ev("after")])
            waited = time.monotonic() - started
            assert info.value.backend == online_store.backend and info.value.retry_after_s >= timeout
            if online_store.backend == "sqlite":
                assert waited >= timeout * 0.9, "SQLite gave up on the lock before its timeout"
            with pytest.raises(BackendUnavailable):
                state.health()
        state.health()
        # The failed batch left nothing behind: its ids are new now.
        assert state.write_events([ev("during"), ev("after")]).new == (True, True)
        assert [e.event_id for e in journal(state)] == ["before", "during", "after"]
    finally:
        state.close()


def test_a_full_backend_is_unavailable_and_the_batch_is_not_half_written(online_store: StoreUnderTest) -> None:
    state = online_store.open()
    try:
        state.write_events([ev("before")])
        batch = [ev(f"x{i}" * 20, item=f"item{i}" * 20, ts=i) for i in range(500)]
        if isinstance(state, SqliteState):
            # No server to fill: the state's own write connection is capped at its current size.
            conn = state._conn()
            conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
            with pytest.raises(BackendUnavailable, match="SQLITE_FULL"):
                state.write_events(batch)
            conn.execute("PRAGMA max_page_count = 1073741823")
        else:
            assert isinstance(state, RedisState)
            admin = redis.Redis.from_url(state.url)
            admin.config_set("maxmemory", 1)
            with pytest.raises(BackendUnavailable, match="maxmemory"):
                state.write_events(batch)
            with pytest.raises(BackendUnavailable):
                state.health()
            admin.config_set("maxmemory", 0)
            admin.close()
        assert [e.event_id for e in journal(state)] == ["before"]
        assert state.write_events(batch).n_new == 500
    finally:
        state.close()


def test_group_commit_joins_concurrent_requests_and_keeps_their_answers_apart(state: OnlineState) -> None:
    writer = GroupCommitWriter(state, max_events=1000)

    async def clients() -> list[tuple[bool, ...]]:
        # 200 one-event requests at once; each id is sent by two of them.
        results = await asyncio.gather(*(writer.submit([ev(f"g{i // 2}", item=f"i{i // 2}", ts=i)]) for i in range(200)))
        return [r.new for r in results]

    try:
        answers = asyncio.run(clients())
        assert sorted(answers).count((True,)) == 100 and sorted(answers).count((False,)) == 100
        assert writer.batches == 200 and writer.commits < 200, f"{writer.commits} commits for 200 requests"
        assert len(journal(state)) == 100
        # Threads get the same service.
        assert writer.write([ev("g0"), ev("new")]).new == (False, True)
    finally:
        writer.close()


def test_group_commit_hands_a_backend_error_to_every_waiting_request(online_store: StoreUnderTest) -> None:
    state = online_store.open(timeout_s=0.3)
    writer = GroupCommitWriter(state, max_events=1000)

    async def clients() -> list[object]:
        return await asyncio.gather(*(writer.submit([ev(f"f{i}")]) for i in range(20)), return_exceptions=True)

    try:
        with online_store.unavailable():
            outcomes = asyncio.run(clients())
        assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
        assert writer.write([ev("f0")]).new == (True,)
    finally:
        writer.close()
        state.close()


def test_make_state_picks_the_backend_by_setting(online_store: StoreUnderTest) -> None:
    where = ({"online_path": online_store.tmp / "state.sqlite3"} if online_store.redis is None
             else {"redis_url": online_store.redis.url})  # fmt: skip
    settings = RecsysSettings(online_backend=online_store.backend, **where)  # type: ignore[arg-type]
    state = make_state(settings)
    assert state is not None and state.backend == online_store.backend
    try:
        state.write_events([ev("m1")])
        other = online_store.open()
        assert other.journal_id == state.journal_id and [e.event_id for e in journal(other)] == ["m1"]
        other.close()
    finally:
        state.close()
    assert make_state(RecsysSettings(online_backend="off")) is None


def test_a_new_store_has_a_journal_of_its_own(tmp_path: Path) -> None:
    base, limits = tmp_path, OnlineLimits(10, 100.0, 100.0, 1.0)
    first = SqliteState(base / "a.sqlite3", limits)
    again = SqliteState(base / "a.sqlite3", limits)
    other = SqliteState(base / "b.sqlite3", limits)
    try:
        assert first.journal_id == again.journal_id != other.journal_id
        conn = sqlite3.connect(base / "a.sqlite3")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        for s in (first, again, other):
            s.close()


@contextlib.contextmanager
def holding(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run `script` in another process until it prints 'held'; kill it on the way out."""
    holder = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_sqlite_a_writer_of_another_process_holding_the_lock_past_the_timeout(tmp_path: Path) -> None:
    """The machine-wide writer lock (a file lock): a writer that gives up on it answers
    BackendUnavailable; its waiter lets the lock go once it gets it, so the next write works."""
    path = tmp_path / "state.sqlite3"
    state = SqliteState(path, OnlineLimits(10, 100.0, 100.0, 0.3))
    hold = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n")  # fmt: skip
    try:
        with holding(hold, f"{path}.writelock", "1.0") as holder:
            with pytest.raises(BackendUnavailable, match="held by another process"):
                state.write_events([ev("blocked")])
            holder.wait(timeout=10)
            assert state.write_events([ev("blocked"), ev("later")]).new == (True, True)
            # Nothing of ours holds the file lock between writes.
            probe = os.open(f"{path}.writelock", os.O_RDWR)
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(probe)
    finally:
        state.close()


def test_sqlite_reads_recent_items_while_another_process_writes(tmp_path: Path) -> None:
    """/recommend reads recent items on its event loop (recent_never_waits): a writer of
    another process in the middle of a transaction holds the read up by nothing, and the read
    sees what was committed before it."""
    path = tmp_path / "state.sqlite3"
    state = SqliteState(path, OnlineLimits(10, 100.0, 100.0, 2.0))
    assert state.recent_never_waits
    state.write_events([ev("before", item="i-before")])
    hold = ("import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\nc.execute(\"INSERT INTO recent VALUES ('u1', 'i-during', 'view', 2000.0)\")\n"
            "print('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n")  # fmt: skip
    try:
        with holding(hold, str(path), "5.0"):
            start = time.monotonic()
            items = [r.item_id for r in state.recent("u1", 10)]
            waited = time.monotonic() - start
            assert items == ["i-before"]  # the writer's uncommitted row is not seen
            assert waited < 1.0, waited  # not the 2 s busy timeout of writes: no wait at all
    finally:
        state.close()


@pytest.mark.parametrize(("setting", "events"), [("FULL", 2), ("NORMAL", 1)])
def test_sqlite_impressions_commit_without_an_fsync_and_events_as_set(tmp_path: Path, setting: str, events: int) -> None:
    """PRAGMA synchronous of each thread's connections (2 FULL, 1 NORMAL): events as the
    setting says; impressions NORMAL always (nobody was acknowledged for one)."""
    state = SqliteState(tmp_path / "state.sqlite3", OnlineLimits(10, 100.0, 100.0, 2.0), setting)  # type: ignore[arg-type]
    try:
        state.write_events([ev("e1")])
        state.write_impression(Impression("r1", "u1", ("i1",), "m:1", "champion", 1000.0))
        assert state._conn().execute("PRAGMA synchronous").fetchone()[0] == events
        assert state._conn("impressions").execute("PRAGMA synchronous").fetchone()[0] == 1
        assert state.impression("r1") is not None
    finally:
        state.close()
