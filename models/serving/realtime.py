"""The API's real-time path, one per API worker: `POST /events` (checked all or nothing,
durable through the group-commit writer before the answer), the user's online items that
/recommend and /rank merge with the trained history, and the impression of each response.

The state is opened in the worker (after the fork: a SQLite connection or a Redis client must
not cross one). Every state call leaves the event loop (base.py: they block), but the read
of recent items on a backend that says it never waits (SQLite).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import bentoml

from models.serving.events import Impression, parse_events
from models.serving.online import BackendUnavailable, BufferedWriter, GroupCommitWriter, OnlineState, WriteResult
from models.serving.outcome_metrics import OutcomeCounter
from models.serving.settings import RecsysSettings

log = logging.getLogger("recsys.online")


@functools.cache
def _metrics() -> dict[str, Any]:
    """Created once per process (a second registration of a name is an error)."""
    return {
        "events": bentoml.metrics.Counter(
            name="recsys_events_total",
            documentation="Events accepted by POST /events, by outcome (new, duplicate, unknown_item)",
            labelnames=["outcome"],
        ),
        "failures": bentoml.metrics.Counter(
            name="recsys_online_failures_total",
            documentation="Online-state operations that failed, by operation (events: the request "
            "was a 503; read: /recommend or /rank used the trained history alone; impression: the "
            "response was sent, its impression not stored) and reason",
            labelnames=["operation", "reason"],
        ),
    }


def retry_after(err: BackendUnavailable) -> str:
    """The Retry-After header (whole seconds, at least 1) of a 503 for this error."""
    return str(max(1, math.ceil(err.retry_after_s)))


class RealTime:
    """The online state of one API worker and its two writers (events, impressions)."""

    def __init__(self, settings: RecsysSettings, state: OnlineState) -> None:
        self.settings = settings
        self.state = state
        self.events = GroupCommitWriter(state, settings.max_events)
        self._failures_logged: set[str] = set()
        # Impressions are written off the response path; bounded, so that a slow backend
        # cannot pile them up in memory (beyond the bound they are dropped and counted).
        self.impressions = BufferedWriter(state, settings.max_events, settings.online_impression_linger_ms / 1000,
                                          settings.max_in_flight, self._impressions_lost)  # fmt: skip
        self.outcomes = OutcomeCounter(state, settings.max_in_flight)

    async def accept(self, rows: Sequence[dict[str, Any]], known: Callable[[str], bool]) -> tuple[WriteResult, list[str]]:
        """Check the batch (InvalidEvent names the index, field and rule), make it durable,
        and return the write result and the items `known` does not know (each once). Raises
        BackendUnavailable when the state cannot take it (nothing was acknowledged)."""
        events = parse_events(rows, time.time(), self.settings.max_events, self.settings.event_max_future_s)
        try:
            result = await self.events.submit(events)
        except BackendUnavailable as err:
            self._failed("events", err)
            raise
        unknown = list(dict.fromkeys(e.item_id for e in events if not known(e.item_id)))
        m = _metrics()["events"]
        m.labels(outcome="new").inc(result.n_new)
        m.labels(outcome="duplicate").inc(result.n_duplicate)
        m.labels(outcome="unknown_item").inc(sum(not known(e.item_id) for e in events))
        self.outcomes.observe(events, result)  # clicks per version and position, off this request
        return result, unknown

    async def recent_item_ids(self, user_id: str) -> list[str] | None:
        """The user's online items, newest first (each once); None when the state cannot be
        read now: the request then uses the trained history alone (counted, logged once per
        reason) rather than failing a recommendation for lack of its freshest part."""
        try:
            limit = self.settings.online_max_items
            if self.state.recent_never_waits:
                recent = self.state.recent(user_id, limit)
            else:
                recent = await asyncio.to_thread(self.state.recent, user_id, limit)
        except BackendUnavailable as err:
            self._failed("read", err)
            return None
        return list(dict.fromkeys(r.item_id for r in recent))

    def record(self, impression: Impression) -> None:
        """Store what a response showed, without holding the response: a click can only
        follow once the client has the response, and one that comes before the buffered write
        (within the linger) is joined from memory (OutcomeCounter). A failed write is counted (recsys_online_failures_total{operation=impression})."""
        self.outcomes.served(impression)  # counted as served, whether or not its write succeeds
        if not self.impressions.add(impression):
            self._count_failure("impression", "overflow")

    def _impressions_lost(self, err: Exception, n: int) -> None:
        """In the writer's thread: waking the event loop for the outcome of every impression
        (call_soon_threadsafe) cost every /recommend a turn of the loop."""
        if isinstance(err, BackendUnavailable):
            self._failed("impression", err, n)
        else:
            self._count_failure("impression", type(err).__name__, n)
            log.error("impression write failed (%d lost): %r", n, err, exc_info=err)

    def health(self) -> None:
        self.state.health()

    def _failed(self, operation: str, err: BackendUnavailable, n: int = 1) -> None:
        self._count_failure(operation, "unavailable", n)
        if operation not in self._failures_logged:
            self._failures_logged.add(operation)
            log.warning("online state %s failed: %s (logged once per operation; all counted in "
                        "recsys_online_failures_total)", operation, err)  # fmt: skip

    @staticmethod
    def _count_failure(operation: str, reason: str, n: int = 1) -> None:
        _metrics()["failures"].labels(operation=operation, reason=reason).inc(n)

    def flush(self) -> None:
        """Write what the writers hold and stop them (the state stays open: the exporter's
        last round at shutdown reads it)."""
        self.events.close()
        self.impressions.close()

    def close(self) -> None:
        self.flush()
        self.state.close()


def impression_of(recommendation_id: str, user_id: str, items: Sequence[str], model_tag: str,
                  variant: str) -> Impression:  # fmt: skip
    return Impression(recommendation_id, user_id, tuple(items), model_tag, variant, time.time())
