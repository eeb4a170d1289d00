"""The embedded online state: one SQLite file in WAL mode, shared by the API workers of one
machine (not over a network file system: WAL needs shared memory between the processes).

Durability: every write is one `BEGIN IMMEDIATE ... COMMIT`, and `synchronous=FULL` makes
SQLite fsync the WAL at each commit, so a batch that was acknowledged survives a power loss
too, not only a `kill -9` of the process (that, `NORMAL` survives as well: the WAL is written
before COMMIT returns, only the fsync is deferred to the checkpoint; a power loss may then
roll back the last commits). An fsync here took 0.04 to 4 ms (by the host's load), so
concurrent requests are joined into one commit by `GroupCommitWriter` (writer.py), not
committed one by one.

Concurrency: WAL lets readers go on while one writer commits. Writers queue on a lock per
process, then on a file lock beside the database (`<file>.writelock`) shared by the
processes of the machine, then take SQLite's own lock (with a busy timeout, for writers that
are not ours): all three within `timeout_s`, past which the write is `BackendUnavailable`.
Open one state per process, after any fork.

Impressions commit with `synchronous=NORMAL` whatever the setting: nobody is acknowledged for
one, a `kill -9` loses none (the WAL is written before COMMIT returns), and the next durable
commit (an event batch, an export's mark) fsyncs them with it. Measured at 64 clients, the
state cost the API workers about 0.7 ms of CPU per /recommend when impressions were fsync'd
every 10 ms and each read took a thread hop (3.0 against 2.3 ms off); with impressions off
and the read on the loop, nothing measurable; with these, the read below and impressions
buffered (writer.py), ~0.25 ms; with merged profiles remembered too (core.recommender),
within the spread of the off-servers (1.75-1.81 against 1.64-1.92 ms).
Reads of a user's recent items never wait on a writer (WAL), so /recommend does them on its
event loop (`recent_never_waits`), with a short busy timeout for the rare moments SQLite makes
a reader wait (a crashed writer's recovery).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from models.serving.events import Event, Impression
from models.serving.online.base import (
    START,
    BackendUnavailable,
    Cursor,
    ExpireResult,
    JournalKind,
    OnlineLimits,
    OnlineState,
    RecentItem,
    WriteResult,
)

# Expiry deletes in chunks of this many rows, one transaction each, so that writers wait at
# most one chunk's time (~10 ms) for the lock, not the whole clean-up's.
EXPIRE_CHUNK_ROWS = 5000
# SQLite result codes that mean "not now" rather than a bug of ours (`sqlite_errorname`).
_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN",
                "SQLITE_READONLY", "SQLITE_PROTOCOL")  # fmt: skip
# Ties in time are broken like Redis breaks ties in a sorted set: by the member "type:item"
# in byte order, descending, so both backends list the same order. (type, item_id) sorts as
# "type:item_id" does because no type is a prefix of another; so the index below serves the
# order, and a user's newest items are read from it without a sort.
_NEWEST_FIRST = "ts DESC, type DESC, item_id DESC"
# The longest a read of recent items waits on SQLite's locks: it runs on an event loop.
READ_BUSY_TIMEOUT_S = 0.05
# Rows per multi-row INSERT: 8 parameters each, well within SQLite's 32,766.
_ROWS_PER_INSERT = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    item_id TEXT NOT NULL, type TEXT NOT NULL, ts REAL NOT NULL, value REAL,
    recommendation_id TEXT, received REAL NOT NULL);
CREATE TABLE IF NOT EXISTS recent (
    user_id TEXT NOT NULL, item_id TEXT NOT NULL, type TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (user_id, item_id, type)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recent_newest ON recent (user_id, ts, type, item_id);
CREATE TABLE IF NOT EXISTS impressions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, recommendation_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL, items TEXT NOT NULL, model_version TEXT NOT NULL,
    variant TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT NULL);
"""


def _lock_file(path: Path, timeout: float) -> int | None:
    """An exclusive flock on `path` within `timeout` s: the descriptor holding it (close it to
    release), or None. Writers of other processes queue here rather than in SQLite's busy
    handler, which sleeps 1, 2, 5, ... up to 100 ms between tries: with two API workers the
    one that just committed got the lock again and again, and the other's requests waited
    (p99 99 ms against 29 ms for one worker, 1-event batches at 64 clients). A blocked flock is
    woken by the kernel the moment the holder lets go. It has no timeout, so the wait runs in
    a thread of its own; one that is given up on releases the lock as soon as it gets it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
    got, handover = threading.Event(), threading.Lock()
    holder: list[int] = []
    abandoned = False

    def wait() -> None:
        # A descriptor of its own: a lock belongs to its open file, so an abandoned waiter
        # can never release a lock that a later one holds.
        mine = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(mine, fcntl.LOCK_EX)
        with handover:
            if abandoned:
                os.close(mine)
                return
            holder.append(mine)
            got.set()

    threading.Thread(target=wait, name="sqlite-write-lock", daemon=True).start()
    got.wait(timeout)
    with handover:
        if holder:
            return holder[0]
        abandoned = True
    return None


def _cursor(seq: int) -> Cursor:
    # Zero-padded: cursors compare as strings in the order of the journal.
    return f"{seq:020d}"


def _seq(cursor: Cursor) -> int:
    if cursor == START:
        return 0
    if not cursor.isdigit():
        raise ValueError(f"cursor {cursor!r} is not a cursor of the SQLite state (digits, or '' for the start)")
    return int(cursor)


# A thread's connections, by use: durable writes and other reads (`synchronous` as set),
# impressions (NORMAL, see above), reads of recent items (short busy timeout).
ConnectionUse = Literal["default", "impressions", "recent"]


class SqliteState(OnlineState):
    backend = "sqlite"
    recent_never_waits = True

    def __init__(
        self, path: Path, limits: OnlineLimits, synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:  # fmt: skip
        self.path, self.limits, self.synchronous = Path(path), limits, synchronous
        self.max_items, self.timeout_s = limits.max_items, limits.timeout_s
        self.retry_after_s = max(1.0, limits.timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._registry_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lock_path = self.path.with_name(self.path.name + ".writelock")
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BackendUnavailable(self.backend, f"cannot create {self.path.parent}: {err}", self.retry_after_s) from err
        with self._unavailable_as_error():
            conn = self._conn()
            # WAL is a property of the file: set once, kept by every later connection.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise BackendUnavailable(self.backend, f"{self.path}: journal mode {mode!r}, WAL needed", self.retry_after_s)
        with self._transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (uuid.uuid4().hex,))
        self.journal_id = str(self._conn().execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0])

    # -- connections and transactions ------------------------------------------------------

    def _conn(self, use: ConnectionUse = "default") -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, use, None)
        if conn is None:
            if self._closed:
                raise RuntimeError(f"{self.path}: the online state is closed")
            # isolation_level=None: no implicit transactions; ours are explicit and IMMEDIATE
            # (a deferred one that upgrades to a write can fail at once with SQLITE_BUSY).
            timeout = READ_BUSY_TIMEOUT_S if use == "recent" else self.timeout_s
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous={'NORMAL' if use == 'impressions' else self.synchronous}")
            setattr(self._local, use, conn)
            with self._registry_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            name = getattr(err, "sqlite_errorname", "")
            if name.startswith(_UNAVAILABLE):
                raise BackendUnavailable(self.backend, f"{self.path}: {name}: {err}", self.retry_after_s) from err
            raise

    @contextlib.contextmanager
    def _transaction(self, use: ConnectionUse = "default") -> Iterator[sqlite3.Connection]:
        """One write transaction: the process's write lock, the machine's (a file lock), then
        SQLite's (each within the timeout), committed on success (durably but for `use`
        "impressions"), rolled back on any error."""
        deadline = time.monotonic() + self.timeout_s
        if not self._write_lock.acquire(timeout=self.timeout_s):
            raise BackendUnavailable(self.backend, f"{self.path}: write lock busy for {self.timeout_s:g} s",
                                     self.retry_after_s)  # fmt: skip
        held: int | None = None
        try:
            held = _lock_file(self._lock_path, max(0.0, deadline - time.monotonic()))
            if held is None:
                raise BackendUnavailable(self.backend, f"{self._lock_path}: held by another process for "
                                         f"{self.timeout_s:g} s", self.retry_after_s)  # fmt: skip
            with self._unavailable_as_error():
                conn = self._conn(use)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # Some errors (SQLITE_FULL, an I/O error) roll the transaction back already.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        finally:
            if held is not None:
                os.close(held)  # closing the descriptor releases its lock
            self._write_lock.release()

    # -- events ------------------------------------------------------------------------------

    def write_events(self, events: Sequence[Event]) -> WriteResult:
        received = time.time()
        inserted: set[str] = set()
        with self._transaction() as conn:
            # Multi-row inserts that return the ids they inserted: a duplicate (of an earlier
            # batch, or of an earlier row of this one) returns nothing. A few statements a
            # batch rather than one per event: Python's per-statement cost was most of the CPU.
            for start in range(0, len(events), _ROWS_PER_INSERT):
                chunk = events[start:start + _ROWS_PER_INSERT]
                rows = conn.execute(
                    "INSERT OR IGNORE INTO events (event_id, user_id, item_id, type, ts, value, recommendation_id, "
                    f"received) VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?, ?)'] * len(chunk))} RETURNING event_id",
                    [x for e in chunk for x in (e.event_id, e.user_id, e.item_id, e.type, e.timestamp, e.value,
                                                e.recommendation_id, received)],
                ).fetchall()  # fmt: skip
                inserted.update(row[0] for row in rows)
            new = _first_occurrences([e.event_id for e in events], inserted)
            fresh = [e for e, is_new in zip(events, new, strict=True) if is_new]
            conn.executemany(
                "INSERT INTO recent VALUES (?, ?, ?, ?) ON CONFLICT (user_id, item_id, type) "
                "DO UPDATE SET ts = max(ts, excluded.ts)", [(e.user_id, e.item_id, e.type, e.timestamp) for e in fresh],
            )  # fmt: skip
            self._cap(conn, list({e.user_id for e in fresh}))
        return WriteResult(new)

    def _cap(self, conn: sqlite3.Connection, users: list[str]) -> None:
        """Drop what is past the newest max_items of these users (only those over the cap)."""
        for start in range(0, len(users), _ROWS_PER_INSERT):
            chunk = users[start:start + _ROWS_PER_INSERT]
            over = conn.execute(
                f"SELECT user_id FROM recent WHERE user_id IN ({', '.join('?' * len(chunk))}) GROUP BY user_id "
                "HAVING count(*) > ?", (*chunk, self.max_items),
            ).fetchall()  # fmt: skip
            for (user_id,) in over:
                conn.execute(
                    f"DELETE FROM recent WHERE user_id = ?1 AND (item_id, type) IN (SELECT item_id, type FROM recent "
                    f"WHERE user_id = ?1 ORDER BY {_NEWEST_FIRST} LIMIT -1 OFFSET ?2)", (user_id, self.max_items),
                )  # fmt: skip

    def recent(self, user_id: str, limit: int) -> list[RecentItem]:
        with self._unavailable_as_error():
            rows = self._conn("recent").execute(
                f"SELECT item_id, ts, type FROM recent WHERE user_id = ? ORDER BY {_NEWEST_FIRST} LIMIT ?",
                (user_id, limit),
            ).fetchall()  # fmt: skip
        return [RecentItem(*row) for row in rows]

    def recent_many(self, user_ids: Sequence[str], limit: int) -> dict[str, list[RecentItem]]:
        users = list(dict.fromkeys(user_ids))
        out: dict[str, list[RecentItem]] = {u: [] for u in users}
        if not users:
            return out
        # One read for all of them (SQLite allows 32,766 parameters; /recommend asks for one
        # user, a batch for at most a few hundred).
        with self._unavailable_as_error():
            rows = self._conn().execute(
                "SELECT user_id, item_id, ts, type FROM (SELECT user_id, item_id, ts, type, row_number() "
                f"OVER (PARTITION BY user_id ORDER BY {_NEWEST_FIRST}) AS n FROM recent "
                f"WHERE user_id IN ({', '.join('?' * len(users))})) WHERE n <= ? ORDER BY user_id, n",
                (*users, limit),
            ).fetchall()  # fmt: skip
        for user_id, item_id, ts, type_ in rows:
            out[user_id].append(RecentItem(item_id, ts, type_))
        return out

    # -- impressions ---------------------------------------------------------------------------

    def write_impressions(self, impressions: Sequence[Impression]) -> WriteResult:
        received = time.time()
        inserted: set[str] = set()
        with self._transaction("impressions") as conn:
            for start in range(0, len(impressions), _ROWS_PER_INSERT):
                chunk = impressions[start:start + _ROWS_PER_INSERT]
                rows = conn.execute(
                    "INSERT OR IGNORE INTO impressions (recommendation_id, user_id, items, model_version, variant, "
                    f"ts, received) VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?)'] * len(chunk))} RETURNING recommendation_id",
                    [x for i in chunk for x in (i.recommendation_id, i.user_id, json.dumps(i.items, ensure_ascii=False),
                                                i.model_version, i.variant, i.timestamp, received)],
                ).fetchall()  # fmt: skip
                inserted.update(row[0] for row in rows)
        return WriteResult(_first_occurrences([i.recommendation_id for i in impressions], inserted))

    def impression(self, recommendation_id: str) -> Impression | None:
        with self._unavailable_as_error():
            row = self._conn().execute(
                "SELECT recommendation_id, user_id, items, model_version, variant, ts FROM impressions "
                "WHERE recommendation_id = ?", (recommendation_id,),
            ).fetchone()  # fmt: skip
        return None if row is None else _impression(row)

    # -- the journal ---------------------------------------------------------------------------

    def export_events(self, after: Cursor, limit: int) -> tuple[list[Event], Cursor]:
        with self._unavailable_as_error():
            rows = self._conn().execute(
                "SELECT seq, event_id, user_id, item_id, type, ts, value, recommendation_id FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (_seq(after), limit),
            ).fetchall()  # fmt: skip
        events = [Event(*row[1:]) for row in rows]
        return events, _cursor(rows[-1][0]) if rows else after

    def export_impressions(self, after: Cursor, limit: int) -> tuple[list[Impression], Cursor]:
        with self._unavailable_as_error():
            rows = self._conn().execute(
                "SELECT seq, recommendation_id, user_id, items, model_version, variant, ts FROM impressions "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (_seq(after), limit),
            ).fetchall()  # fmt: skip
        return [_impression(row[1:]) for row in rows], _cursor(rows[-1][0]) if rows else after

    def mark_exported(self, kind: JournalKind, cursor: Cursor) -> None:
        seq = _seq(cursor)
        with self._transaction() as conn:
            # Never backwards: a late or repeated mark leaves the furthest one.
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                "max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (f"exported_{kind}", str(seq)),
            )  # fmt: skip

    def _exported(self, kind: JournalKind) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (f"exported_{kind}",)).fetchone()
        return 0 if row is None else int(row[0])

    def _delete_chunks(self, table: str, key: str, select_keys: str, params: tuple[object, ...]) -> int:
        """DELETE FROM table WHERE key IN (select_keys), a chunk a transaction."""
        total = 0
        while True:
            with self._transaction() as conn:
                n = conn.execute(f"DELETE FROM {table} WHERE {key} IN ({select_keys} LIMIT {EXPIRE_CHUNK_ROWS})",
                                 params).rowcount  # fmt: skip
            total += n
            if n < EXPIRE_CHUNK_ROWS:
                return total

    def expire(self, now: float) -> ExpireResult:
        cutoff, journal_cutoff = now - self.limits.retention_s, now - self.limits.journal_s
        with self._unavailable_as_error():
            key = "(user_id, item_id, type)"
            recent = self._delete_chunks("recent", key, "SELECT user_id, item_id, type FROM recent WHERE ts < ?", (cutoff,))
            # The cap again, for users written before it was lowered.
            recent += self._delete_chunks(
                "recent", key, "SELECT user_id, item_id, type FROM (SELECT user_id, item_id, type, row_number() "
                f"OVER (PARTITION BY user_id ORDER BY {_NEWEST_FIRST}) AS n FROM recent) WHERE n > ?", (self.max_items,),
            )  # fmt: skip
            counts = {}
            for kind in ("events", "impressions"):
                counts[kind] = self._delete_chunks(
                    kind, "seq", f"SELECT seq FROM {kind} WHERE seq <= ? AND received < ?",
                    (self._exported(kind), journal_cutoff),
                )  # fmt: skip
        return ExpireResult(recent, counts["events"], counts["impressions"])

    # -- the rest ------------------------------------------------------------------------------

    def health(self) -> None:
        # Takes and releases the write lock: a writer holding it past the timeout, a file
        # that cannot be opened or written all show up here as they would on a write.
        with self._transaction():
            pass

    def close(self) -> None:
        self._closed = True
        with self._registry_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def _first_occurrences(ids: list[str], inserted: set[str]) -> tuple[bool, ...]:
    """Which rows were new: the first row of an inserted id (a later one in the same batch was
    ignored as a duplicate)."""
    left, new = set(inserted), []
    for i in ids:
        new.append(i in left)
        left.discard(i)
    return tuple(new)


def _impression(row: Sequence[object]) -> Impression:
    rid, user_id, items, model_version, variant, ts = row
    return Impression(str(rid), str(user_id), tuple(json.loads(str(items))), str(model_version), str(variant),
                      float(ts))  # type: ignore[arg-type]  # fmt: skip
