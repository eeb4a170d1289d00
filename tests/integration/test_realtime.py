"""The API's real-time path in-process (models/serving/realtime.py) on a real SQLite state:
events taken all or nothing, and impressions that fail counted without failing anything."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from models.serving.events import Impression, InvalidEvent
from models.serving.online import BackendUnavailable, OnlineLimits, WriteResult
from models.serving.online.sqlite import SqliteState
from models.serving.realtime import RealTime, _metrics, impression_of, retry_after
from models.serving.settings import RecsysSettings

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
LIMITS = OnlineLimits(max_items=50, retention_s=1e9, journal_s=1e9, timeout_s=2)


class DownForImpressions(SqliteState):
    """A state whose impression writes fail as an unreachable backend's would."""

    def write_impressions(self, impressions: Sequence[Impression]) -> WriteResult:
        raise BackendUnavailable("sqlite", "test: down", 3.2)


@pytest.fixture
def realtime(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RealTime]:
    cls = getattr(request, "param", SqliteState)
    rt = RealTime(RecsysSettings(max_events=10), cls(tmp_path / "state.sqlite3", LIMITS))
    try:
        yield rt
    finally:
        rt.close()


def _row(user: str, item: str, **extra: object) -> dict[str, object]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "type": "view", **extra}


def test_events_are_taken_then_read_newest_first(realtime: RealTime) -> None:
    rows = [_row("u", "a", timestamp=1.0), _row("u", "b", timestamp=2.0), _row("u", "zz", timestamp=3.0)]
    result, unknown = asyncio.run(realtime.accept(rows, lambda item: item != "zz"))
    assert (result.n_new, result.n_duplicate, unknown) == (3, 0, ["zz"])
    result, _ = asyncio.run(realtime.accept(rows[:1], lambda item: True))
    assert (result.n_new, result.n_duplicate) == (0, 1)
    assert asyncio.run(realtime.recent_item_ids("u")) == ["zz", "b", "a"]


@pytest.mark.parametrize(
    ("bad", "where"),
    [({"type": "rating"}, "events[1].value"), ({"timestamp": 1e13}, "events[1].timestamp"),
     ({"item_id": ""}, "events[1].item_id")],
)  # fmt: skip
def test_a_bad_event_stores_none_of_the_batch(realtime: RealTime, bad: dict[str, object], where: str) -> None:
    rows = [_row("all-or-nothing", "a"), {**_row("all-or-nothing", "b"), **bad}]
    with pytest.raises(InvalidEvent, match=where.replace("[", r"\[").replace("]", r"\]")):
        asyncio.run(realtime.accept(rows, lambda item: True))
    assert asyncio.run(realtime.recent_item_ids("all-or-nothing")) == []


@pytest.mark.parametrize("realtime", [DownForImpressions], indirect=True)
def test_failed_impressions_are_counted_and_logged_once(realtime: RealTime, caplog: pytest.LogCaptureFixture) -> None:
    counter = _metrics()["failures"].labels(operation="impression", reason="unavailable")
    before = counter._value.get()

    async def two_responses() -> None:
        for _ in range(2):
            realtime.record(impression_of(uuid.uuid4().hex, "u", ["a", "b"], "m:1", "champion"))
        while realtime.impressions.pending:
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="recsys.online"):
        asyncio.run(asyncio.wait_for(two_responses(), 10))
    assert counter._value.get() == before + 2
    assert len([r for r in caplog.records if "impression failed" in r.getMessage()]) == 1


def test_impressions_are_stored_under_their_id(realtime: RealTime) -> None:
    rid = uuid.uuid4().hex

    async def one() -> None:
        realtime.record(impression_of(rid, "u", ["a", "b"], "m:1", "champion"))
        while realtime.impressions.pending:
            await asyncio.sleep(0.01)

    asyncio.run(one())
    stored = realtime.state.impression(rid)
    assert stored is not None and stored.items == ("a", "b") and stored.variant == "champion"


@pytest.mark.parametrize(("hint", "header"), [(0.05, "1"), (1.0, "1"), (3.2, "4")])
def test_retry_after_is_whole_seconds_rounded_up(hint: float, header: str) -> None:
    assert retry_after(BackendUnavailable("redis", "down", hint)) == header
