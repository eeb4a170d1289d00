"""The worker heap's set-up (models/serving/heap.py): start-up objects frozen, and the
collector's thresholds raised so that full collections stop interrupting requests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from models.serving.heap import GC_THRESHOLDS, freeze_startup_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


REQUESTS = 10_000


def full_collections(requests: int, in_flight: int = 64, objects: int = 150) -> int:
    """Full collections while requests come and go in waves of `in_flight` (a joined call's
    callers all answered at once), each with `objects` containers alive until then, and one
    object per request kept (what a worker's counters and caches hold on to)."""
    kept = []
    before = gc.get_stats()[2]["collections"]
    for wave in range(requests // in_flight):
        alive = [[{"row": [j]} for j in range(objects)] for _ in range(in_flight)]
        kept.extend({"request": [wave, i]} for i in range(in_flight))
        del alive
    return gc.get_stats()[2]["collections"] - before


def test_start_up_objects_are_frozen_and_the_thresholds_set(restored_gc: None) -> None:
    gc.unfreeze()
    freeze_startup_heap()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == GC_THRESHOLDS


def test_the_thresholds_make_full_collections_rare(restored_gc: None) -> None:
    gc.collect()
    gc.freeze()  # as a worker does: what is left is what the requests made
    gc.set_threshold(700, 10, 10)  # Python's default
    default = full_collections(REQUESTS)
    gc.collect()
    gc.set_threshold(*GC_THRESHOLDS)
    tuned = full_collections(REQUESTS)
    assert default >= 3, "the simulated load no longer triggers full collections: the test measures nothing"
    assert tuned * 5 <= default, (tuned, default)
