"""The online state in Redis, for many replicas: one `redis-server` shared by all of them.

Keys (under a prefix, default `recsys:`): `id:<event_id>` (seen ids, `journal_s` as TTL),
`u:<user_id>` (a sorted set of "type:item_id" scored by event time, capped at `max_items`,
`retention_s` as TTL, renewed on each write), `events` and `impressions` (streams: the
journals, in the order Redis appended them), `imp:<recommendation_id>` (an impression as
JSON, `journal_s` as TTL), `exported:<kind>`, `journal_id`.

A batch is one Lua script: the id check, the journal entry and the user's set change
together or not at all, and concurrent writers from any replica cannot interleave inside a
batch. The script reaches keys it does not declare: fine on one server, not on a Redis
Cluster (which this module does not support).

Durability is the server's: an acknowledged write survives a `kill -9` of redis-server only
with the append-only file (`appendonly yes`; Redis writes it before it replies), and a power
loss only with `appendfsync always` (fsync before the reply; `everysec`, Redis' default,
may lose the last second). RDB snapshots alone lose everything since the last one. The
server's settings are read once (`CONFIG GET`, where allowed) and a weaker setting is logged
as a warning: it is the operator's choice, not ours to refuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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

log = logging.getLogger(__name__)

# Keys visited per SCAN call by `expire` (Redis' hint; a call takes well under a millisecond).
SCAN_COUNT = 1000
# Replies that mean "not now" (the server is full, a replica, cannot persist, busy in a
# script), not a bug: those redis-py maps to classes, and those it leaves as text.
_UNAVAILABLE_ERRORS = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                       redis.exceptions.MasterDownError, redis.exceptions.TryAgainError)  # fmt: skip
_UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "BUSY", "NOREPLICAS")

# "#!lua" (no flags): Redis treats the script as one that writes, so when the server is out
# of memory it refuses the script before its first command, not halfway through a batch.
_WRITE_EVENTS = """#!lua
local p, id_ttl, user_ttl, max_items = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, touched = {}, {}
for i = 5, #ARGV, 7 do
  local eid, user, item, typ, ts, val, rid = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6]
  if redis.call('SET', p .. 'id:' .. eid, '1', 'NX', 'EX', id_ttl) then
    redis.call('XADD', p .. 'events', '*', 'e', eid, 'u', user, 'i', item, 't', typ, 'ts', ts, 'v', val, 'r', rid)
    redis.call('ZADD', p .. 'u:' .. user, 'GT', ts, typ .. ':' .. item)
    touched[user] = true
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
for user, _ in pairs(touched) do
  local key = p .. 'u:' .. user
  redis.call('ZREMRANGEBYRANK', key, 0, -(max_items + 1))
  redis.call('EXPIRE', key, user_ttl)
end
return out
"""

_WRITE_IMPRESSIONS = """#!lua
local p, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 2 do
  if redis.call('SET', p .. 'imp:' .. ARGV[i], ARGV[i+1], 'NX', 'EX', ttl) then
    redis.call('XADD', p .. 'impressions', '*', 'j', ARGV[i+1])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Never backwards: a late or repeated mark leaves the furthest one (cursors compare as strings).
_MARK_EXPORTED = """#!lua
local current = redis.call('GET', KEYS[1])
if (not current) or current < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""


def _cursor(stream_id: str) -> Cursor:
    # Zero-padded "ms-seq": cursors compare as strings in the order of the stream.
    ms, seq = stream_id.split("-")
    return f"{int(ms):015d}-{int(seq):010d}"


def _stream_id(cursor: Cursor) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        raise ValueError(f"cursor {cursor!r} is not a cursor of the Redis state ('<ms>-<seq>', or '' for the start)")
    return int(ms), int(seq)


class RedisState(OnlineState):
    backend = "redis"

    def __init__(self, url: str, limits: OnlineLimits, prefix: str = "recsys:") -> None:
        self.url, self.limits, self.prefix = url, limits, prefix
        self.max_items, self.timeout_s = limits.max_items, limits.timeout_s
        # Key TTLs are whole seconds, and at least one.
        self._id_ttl, self._user_ttl = max(1, round(limits.journal_s)), max(1, round(limits.retention_s))
        self.retry_after_s = max(1.0, limits.timeout_s)
        timeout_s = limits.timeout_s
        # One retry: a pooled connection that died with a restarted server is replaced once;
        # the scripts are idempotent (ids), so a retried batch cannot be counted twice.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1), health_check_interval=30,
        )  # fmt: skip
        self._write_events = self._client.register_script(_WRITE_EVENTS)
        self._write_impressions = self._client.register_script(_WRITE_IMPRESSIONS)
        self._mark_exported = self._client.register_script(_MARK_EXPORTED)
        # Nothing is asked of the server until it is needed: a service starts with Redis
        # down, and says so on its readiness probe (health), not by failing to start.
        self._journal_id: str | None = None
        self.durability: str | None = None

    @property
    def journal_id(self) -> str:  # type: ignore[override]
        if self._journal_id is None:
            with self._unavailable_as_error():
                self._client.set(f"{self.prefix}journal_id", uuid.uuid4().hex, nx=True)
                self._journal_id = str(self._client.get(f"{self.prefix}journal_id"))
        return self._journal_id

    def _read_durability(self) -> str:
        try:
            config = self._client.config_get("append*")
        except redis.ResponseError as err:  # CONFIG is often disabled on managed servers
            return f"unknown (CONFIG GET refused: {err})"
        appendonly, fsync = config.get("appendonly"), config.get("appendfsync")
        if appendonly != "yes":
            log.warning("Redis at %s has appendonly=%s: acknowledged events are lost if it is killed "
                        "(set appendonly yes, appendfsync always)", self.url, appendonly)  # fmt: skip
        elif fsync != "always":
            log.warning("Redis at %s has appendfsync=%s: a power loss may lose acknowledged events "
                        "(appendfsync always fsyncs before each reply)", self.url, fsync)  # fmt: skip
        return f"appendonly={appendonly} appendfsync={fsync}"

    @contextlib.contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:  # BusyLoadingError is a ConnectionError
            raise BackendUnavailable(self.backend, f"{self.url}: {type(err).__name__}: {err}", self.retry_after_s) from err
        except redis.ResponseError as err:
            if isinstance(err, _UNAVAILABLE_ERRORS) or str(err).startswith(_UNAVAILABLE_REPLIES):
                raise BackendUnavailable(self.backend, f"{self.url}: {err}", self.retry_after_s) from err
            raise

    # -- events ------------------------------------------------------------------------------

    def write_events(self, events: Sequence[Event]) -> WriteResult:
        args: list[str | int] = [self.prefix, self._id_ttl, self._user_ttl, self.max_items]
        for e in events:
            args += [e.event_id, e.user_id, e.item_id, e.type, repr(e.timestamp),
                     "" if e.value is None else repr(e.value), e.recommendation_id or ""]  # fmt: skip
        with self._unavailable_as_error():
            flags = self._write_events(args=args)
        return WriteResult(tuple(bool(f) for f in flags))

    def recent(self, user_id: str, limit: int) -> list[RecentItem]:
        return self.recent_many([user_id], limit)[user_id]

    def recent_many(self, user_ids: Sequence[str], limit: int) -> dict[str, list[RecentItem]]:
        users = list(dict.fromkeys(user_ids))
        if limit <= 0:
            return {u: [] for u in users}
        pipe = self._client.pipeline(transaction=False)
        for u in users:
            pipe.zrevrange(f"{self.prefix}u:{u}", 0, limit - 1, withscores=True)
        with self._unavailable_as_error():
            replies = pipe.execute()
        out: dict[str, list[RecentItem]] = {}
        for u, members in zip(users, replies, strict=True):
            items = []
            for member, score in members:
                type_, _, item_id = member.partition(":")  # a type never holds ':'
                items.append(RecentItem(item_id, float(score), type_))
            out[u] = items
        return out

    # -- impressions ---------------------------------------------------------------------------

    def write_impressions(self, impressions: Sequence[Impression]) -> WriteResult:
        args: list[str | int] = [self.prefix, self._id_ttl]
        for i in impressions:
            args += [i.recommendation_id, json.dumps([i.recommendation_id, i.user_id, list(i.items), i.model_version,
                                                      i.variant, i.timestamp], ensure_ascii=False)]  # fmt: skip
        with self._unavailable_as_error():
            flags = self._write_impressions(args=args)
        return WriteResult(tuple(bool(f) for f in flags))

    def impression(self, recommendation_id: str) -> Impression | None:
        with self._unavailable_as_error():
            payload = self._client.get(f"{self.prefix}imp:{recommendation_id}")
        return None if payload is None else _impression(str(payload))

    # -- the journal ---------------------------------------------------------------------------

    def _export(self, kind: JournalKind, after: Cursor, limit: int) -> tuple[list[dict[str, str]], Cursor]:
        start = "-" if after == START else "({}-{}".format(*_stream_id(after))
        with self._unavailable_as_error():
            entries = self._client.xrange(f"{self.prefix}{kind}", start, "+", count=limit)
        return [fields for _, fields in entries], _cursor(entries[-1][0]) if entries else after

    def export_events(self, after: Cursor, limit: int) -> tuple[list[Event], Cursor]:
        entries, cursor = self._export("events", after, limit)
        events = [
            Event(f["e"], f["u"], f["i"], f["t"], float(f["ts"]),  # type: ignore[arg-type]
                  float(f["v"]) if f["v"] else None, f["r"] or None)
            for f in entries
        ]  # fmt: skip
        return events, cursor

    def export_impressions(self, after: Cursor, limit: int) -> tuple[list[Impression], Cursor]:
        entries, cursor = self._export("impressions", after, limit)
        return [_impression(f["j"]) for f in entries], cursor

    def mark_exported(self, kind: JournalKind, cursor: Cursor) -> None:
        _stream_id(cursor)
        with self._unavailable_as_error():
            self._mark_exported(keys=[f"{self.prefix}exported:{kind}"], args=[cursor])

    def expire(self, now: float) -> ExpireResult:
        cutoff, journal_cutoff = now - self.limits.retention_s, now - self.limits.journal_s
        removed = 0
        with self._unavailable_as_error():
            # Users idle for the retention period are gone by TTL already; this drops the old
            # entries of active users.
            for keys in self._scan_batches(f"{self.prefix}u:*"):
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.zremrangebyscore(key, "-inf", f"({cutoff!r}")
                    pipe.zremrangebyrank(key, 0, -(self.max_items + 1))
                removed += sum(pipe.execute())
            trimmed = {}
            for kind in ("events", "impressions"):
                exported = self._client.get(f"{self.prefix}exported:{kind}")
                if exported is None:
                    trimmed[kind] = 0
                    continue
                ms, seq = _stream_id(str(exported))
                # Stream ids are arrival times in ms: keep what is not exported or not old enough.
                min_id = min((ms, seq + 1), (max(0, int(journal_cutoff * 1000)), 0))
                trimmed[kind] = int(self._client.xtrim(f"{self.prefix}{kind}", minid=f"{min_id[0]}-{min_id[1]}", approximate=False))
        return ExpireResult(removed, trimmed["events"], trimmed["impressions"])

    def _scan_batches(self, match: str) -> Iterator[list[str]]:
        cursor = 0
        while True:
            cursor, keys = self._client.scan(cursor, match=match, count=SCAN_COUNT)
            if keys:
                yield keys
            if cursor == 0:
                return

    # -- the rest ------------------------------------------------------------------------------

    def health(self) -> None:
        with self._unavailable_as_error():
            self._client.ping()
            # PING answers while the server refuses writes (out of memory, a failing disk):
            # ask for a write, to a key of its own, the way a batch would.
            self._client.set(f"{self.prefix}health", "1", ex=60)
            if self.durability is None:
                self.durability = self._read_durability()

    def close(self) -> None:
        self._client.close()


def _impression(payload: str) -> Impression:
    rid, user_id, items, model_version, variant, ts = json.loads(payload)
    return Impression(rid, user_id, tuple(items), model_version, variant, float(ts))
