"""Live outcome counters in-process (models/serving/outcome_metrics.py) on a real SQLite
state: an impression is counted when served; a click naming its recommendation_id is counted
under the version, variant and position that served it, once (a retried event is not)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from models.serving.online import OnlineLimits
from models.serving.online.sqlite import SqliteState
from models.serving.outcome_metrics import _metrics, position_label
from models.serving.realtime import RealTime, impression_of
from models.serving.settings import RecsysSettings

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
LIMITS = OnlineLimits(max_items=50, retention_s=1e9, journal_s=1e9, timeout_s=2)


def _value(name: str, **labels: str) -> float:
    return float(_metrics()[name].labels(**labels)._value.get())


@pytest.mark.parametrize(("position", "label"), [(1, "1"), (4, "4-5"), (10, "6-10"), (57, "21+"), (None, "not_shown")])
def test_position_labels_are_bounded(position: int | None, label: str) -> None:
    assert position_label(position) == label


def test_a_click_is_counted_under_the_version_and_position_that_served_it(tmp_path: Path) -> None:
    tag, rid = f"m:{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rt = RealTime(RecsysSettings(max_events=10), SqliteState(tmp_path / "s.sqlite3", LIMITS))
    click = {"event_id": uuid.uuid4().hex, "user_id": "u", "item_id": "c", "type": "click",
             "timestamp": 10.0, "recommendation_id": rid}  # fmt: skip
    stray = {**click, "event_id": uuid.uuid4().hex, "item_id": "zz"}  # not in the response

    async def scenario() -> None:
        rt.record(impression_of(rid, "u", ["a", "b", "c"], tag, "challenger"))
        await asyncio.sleep(0.2)  # the impression's group commit
        for batch in ([click, stray], [click]):  # the second: a retry, a duplicate
            await rt.accept(batch, lambda item: True)
            await asyncio.gather(*rt.outcomes._tasks)

    try:
        asyncio.run(scenario())
    finally:
        rt.close()
    assert _value("impressions", model_version=tag, variant="challenger") == 1
    assert _value("outcomes", model_version=tag, variant="challenger", type="click", position="3") == 1
    assert _value("outcomes", model_version=tag, variant="challenger", type="click", position="not_shown") == 1
