"""Live online outcomes as Prometheus counters: impressions per model version and variant when
served, and events that name a `recommendation_id` per version, variant, event type and the
position of the item in that response. CTR per version in PromQL:

    sum by (model_version) (rate(recsys_outcome_events_total{type="click", position!="not_shown"}[10m]))
      / sum by (model_version) (rate(recsys_impressions_total[10m]))

(clicks per impression; `python -m training models ab-report` counts clicked impressions and
gives the confidence intervals). Events without an id are attributed offline only (the
report's attribution window): matching them here would cost a search per event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import bentoml

from models.serving.events import Event, Impression
from models.serving.online import BackendUnavailable, OnlineState, WriteResult

log = logging.getLogger("recsys.outcomes")
# Position buckets: bounded label values whatever k is (max_k is 100).
POSITION_EDGES = ((1, "1"), (2, "2"), (3, "3"), (5, "4-5"), (10, "6-10"), (20, "11-20"))


@functools.cache
def _metrics() -> dict[str, Any]:
    return {
        "impressions": bentoml.metrics.Counter(
            name="recsys_impressions_total",
            documentation="Responses of /recommend and /rank served, by model version and variant",
            labelnames=["model_version", "variant"],
        ),
        "outcomes": bentoml.metrics.Counter(
            name="recsys_outcome_events_total",
            documentation="New events naming a recommendation_id, by the model version and variant that "
            "served it, event type and the item's position there (not_shown: the item was not in it; "
            "unknown: the impression was not found, e.g. expired)",
            labelnames=["model_version", "variant", "type", "position"],
        ),
    }


def position_label(position: int | None) -> str:
    if position is None:
        return "not_shown"
    for edge, label in POSITION_EDGES:
        if position <= edge:
            return label
    return "21+"


def count_impression(impression: Impression) -> None:
    _metrics()["impressions"].labels(model_version=impression.model_version, variant=impression.variant).inc()


class OutcomeCounter:
    """Counts the outcome events of one API worker off the response path. An impression is
    looked up among the last `remembered` this worker served first: a client's click can come
    before the impression's write is committed (the simulator's did, 1 in 161), and a
    keep-alive connection keeps a client on its worker. Else in the online state (another
    worker served it), in a thread; at most `max_pending` batches at a time (beyond, a batch
    is not counted: counted as skipped)."""

    def __init__(self, state: OnlineState, max_pending: int, remembered: int = 4096) -> None:
        self.state = state
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[str, Impression] = OrderedDict()
        self._remembered = remembered

    def served(self, impression: Impression) -> None:
        count_impression(impression)
        self._recent[impression.recommendation_id] = impression
        if len(self._recent) > self._remembered:
            self._recent.popitem(last=False)

    def observe(self, events: Sequence[Event], result: WriteResult) -> None:
        referring = [e for e, new in zip(events, result.new) if new and e.recommendation_id is not None]
        if not referring:
            return
        if len(self._tasks) >= self.max_pending:
            _metrics()["outcomes"].labels(model_version="unknown", variant="unknown", type="skipped",
                                          position="unknown").inc(len(referring))  # fmt: skip
            return
        # Read on the event loop, which alone writes it: the thread gets a plain dict.
        mine = {e.recommendation_id: self._recent[e.recommendation_id] for e in referring
                if e.recommendation_id in self._recent}  # fmt: skip
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._count, referring, mine))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.error("counting outcome events failed: %r", err, exc_info=err)

    def _count(self, events: Sequence[Event], mine: dict[str | None, Impression]) -> None:
        counter = _metrics()["outcomes"]
        found: dict[str, Impression | None] = {k: v for k, v in mine.items() if k is not None}
        for event in events:
            rid = event.recommendation_id
            assert rid is not None
            if rid not in found:
                try:
                    found[rid] = self.state.impression(rid)
                except BackendUnavailable:
                    found[rid] = None
            imp = found[rid]
            if imp is None:
                counter.labels(model_version="unknown", variant="unknown", type=event.type, position="unknown").inc()
                continue
            position = imp.items.index(event.item_id) + 1 if event.item_id in imp.items else None
            counter.labels(model_version=imp.model_version, variant=imp.variant, type=event.type,
                           position=position_label(position)).inc()  # fmt: skip
