"""The online state's interface: what every backend (sqlite.py, redis.py) does, and nothing
that only one of them can.

The state holds, shared by every API worker and replica:
- per user, the recent items with their time and type (newest by event time first; one
  entry per (item, type), at its latest time; at most `max_items` per user);
- a journal of every accepted event and impression in a stable order, read by the event-log
  exporter (models/serving/event_log.py) through an opaque cursor, and dropped only once it
  is both exported (`mark_exported`) and older than `journal_s`;
- the ids seen, so that a repeated `event_id` changes nothing (for `journal_s` at least: an
  id retried later than that counts as new; the event log's reader drops it again), and the
  impressions by recommendation_id, for `journal_s`.

Two periods, because they bound different things: `retention_s` the per-user state (what
the next recommendation uses, by event time), `journal_s` the ids, impressions and exported
journal (one entry per event and per response: at 100 events/s, a day is 8.6 million ids,
about 1 GB in Redis).

Every method is synchronous and may block (on disk, on a lock, on the network): never call
one from an event loop, except `recent` of a backend whose `recent_never_waits` is True
(SQLite's WAL reads: ~30 µs, held up by no writer; a thread hop per /recommend cost more).
An async API calls the others in a thread (`asyncio.to_thread`, or a BentoML `def` API,
which runs in a thread pool), and writes events and impressions through
`GroupCommitWriter` (writer.py), which joins the writes of concurrent requests into one
durable commit.
Errors of the backend (down, locked past the timeout, full) are `BackendUnavailable`, with a
hint of when to retry: the API answers 503 with `Retry-After`, never a silent drop.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from models.serving.events import Event, Impression

# A position in a journal: opaque, ordered within one journal (`OnlineState.journal_id`);
# START is before the first entry.
Cursor = str
START: Cursor = ""
JournalKind = Literal["events", "impressions"]


@dataclass(frozen=True)
class OnlineLimits:
    """What bounds the state (RecsysSettings: online_max_items, online_retention_s,
    online_journal_s, online_timeout_s)."""

    max_items: int  # recent items kept per user
    retention_s: float  # per-user entries older than this (event time) are expired
    journal_s: float  # ids, impressions and exported journal entries are kept this long
    timeout_s: float  # longest wait for a lock, a connection or a reply


class RecentItem(NamedTuple):
    item_id: str
    timestamp: float
    type: str


@dataclass(frozen=True)
class WriteResult:
    """Per event of the batch, in order: True if it was new, False if its id was seen."""

    new: tuple[bool, ...]

    @property
    def n_new(self) -> int:
        return sum(self.new)

    @property
    def n_duplicate(self) -> int:
        return len(self.new) - self.n_new

    def split(self, sizes: Sequence[int]) -> list[WriteResult]:
        """The results of consecutive sub-batches of these sizes (a joined commit's parts)."""
        if sum(sizes) != len(self.new):
            raise ValueError(f"sizes sum to {sum(sizes)}, the result has {len(self.new)} events")
        out, start = [], 0
        for n in sizes:
            out.append(WriteResult(self.new[start:start + n]))
            start += n
        return out


@dataclass(frozen=True)
class ExpireResult:
    recent_items: int  # per-user entries dropped (older than retention_s, or over the cap)
    events: int  # journal entries dropped (exported and received before now - journal_s)
    impressions: int


class BackendUnavailable(RuntimeError):
    """The backend cannot take or give state now: unreachable, locked past the timeout, full,
    loading. `retry_after_s` is the hint for a 503's Retry-After."""

    def __init__(self, backend: str, reason: str, retry_after_s: float) -> None:
        self.backend, self.reason, self.retry_after_s = backend, reason, retry_after_s
        super().__init__(f"online state ({backend}) unavailable: {reason}; retry after {retry_after_s:g} s")


class OnlineState(abc.ABC):
    """One backend of the online state. Instances are safe to share between threads."""

    backend: str
    # True when `recent` is a local read that no writer holds up: called on the event loop.
    recent_never_waits: bool = False
    # Identifies the journal the cursors belong to: a new, empty store has a new id, so that
    # the exporter never mistakes its cursors for those of an earlier store.
    journal_id: str

    @abc.abstractmethod
    def write_events(self, events: Sequence[Event]) -> WriteResult:
        """Record the events in one atomic, durable step (all or none; durable when this
        returns). An id seen before, also earlier in the same batch, is a duplicate and
        changes nothing."""

    @abc.abstractmethod
    def recent(self, user_id: str, limit: int) -> list[RecentItem]:
        """The user's recent items, newest event time first (not arrival order)."""

    def recent_many(self, user_ids: Sequence[str], limit: int) -> dict[str, list[RecentItem]]:
        """`recent` of each user (every user a key, an unknown one with an empty list)."""
        return {u: self.recent(u, limit) for u in dict.fromkeys(user_ids)}

    @abc.abstractmethod
    def write_impressions(self, impressions: Sequence[Impression]) -> WriteResult:
        """Record what responses showed, in one atomic, durable step; an id recorded before
        (also earlier in the batch) is a duplicate and changes nothing."""

    def write_impression(self, impression: Impression) -> bool:
        """One impression; False if its id was recorded already."""
        return self.write_impressions([impression]).new[0]

    @abc.abstractmethod
    def impression(self, recommendation_id: str) -> Impression | None:
        """The impression under that id, or None (unknown, or expired)."""

    @abc.abstractmethod
    def export_events(self, after: Cursor, limit: int) -> tuple[list[Event], Cursor]:
        """Up to `limit` journal events after the cursor, in the journal's order, and the
        cursor of the last one (`after` itself when there are none). The order is stable:
        once an entry is visible, no entry is ever inserted before it."""

    @abc.abstractmethod
    def export_impressions(self, after: Cursor, limit: int) -> tuple[list[Impression], Cursor]:
        """As `export_events`, for the impressions' journal."""

    @abc.abstractmethod
    def mark_exported(self, kind: JournalKind, cursor: Cursor) -> None:
        """The journal up to `cursor` is safely in the event log: `expire` may drop it."""

    @abc.abstractmethod
    def expire(self, now: float) -> ExpireResult:
        """Drop per-user entries older than the retention period (event time before
        `now - retention_s`) or beyond the cap, and journal entries (events, impressions)
        both exported and received before `now - journal_s`. Ids and impressions go with
        their journal entries (SQLite) or by TTL (Redis)."""

    @abc.abstractmethod
    def health(self) -> None:
        """Return if the backend can take writes now; else raise BackendUnavailable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files; the instance is unusable afterwards."""
