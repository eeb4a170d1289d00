"""The event log: the online state's journals in a Parquet dataset partitioned by date, each
entry exactly once across exporter runs, crashes between writing and committing, and
restarts; the reader gives back what was written."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.serving.event_log import EventLogExporter, read_event_log, read_impressions
from models.serving.events import Event, Impression
from models.serving.export_loop import ExportLoop, journal_lock, lock_path
from models.serving.online.base import OnlineLimits, OnlineState
from models.serving.online.sqlite import SqliteState
from tests.helpers import poll_until
from tests.integration.conftest import StoreUnderTest

DAY = 86400.0
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
LIMITS = OnlineLimits(max_items=50, retention_s=DAY, journal_s=DAY, timeout_s=1.0)


def events(first: int, n: int) -> list[Event]:
    # Three days, ratings with values, unicode ids, the odd recommendation_id.
    return [Event(f"é{i}", f"u{i % 4}", f"i{i % 9}", "rating" if i % 3 == 0 else "click", T0 + (i % 3) * DAY + i,
                  float(i % 5) + 0.5 if i % 3 == 0 else None, f"r{i}" if i % 2 else None)
            for i in range(first, first + n)]  # fmt: skip


def as_rows(evs: list[Event]) -> list[tuple[object, ...]]:
    return sorted((e.event_id, e.user_id, e.item_id, e.type, e.timestamp, e.value, e.recommendation_id) for e in evs)


def logged_rows(uri: str) -> list[tuple[object, ...]]:
    frame = read_event_log(uri)
    value = frame["value"].astype(object).where(frame["value"].notna(), None)
    return sorted(zip(frame["event_id"], frame["user_id"], frame["item_id"], frame["type"], frame["ts"], value,
                      frame["recommendation_id"].astype(object).where(frame["recommendation_id"].notna(), None),
                      strict=True))  # fmt: skip


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_each_event_is_logged_once_across_runs_partitioned_by_date(state: OnlineState, tmp_path: Path,
                                                                   as_url: bool) -> None:  # fmt: skip
    root = tmp_path / "log"
    uri = root.as_uri() if as_url else str(root)
    written = events(0, 30)
    state.write_events(written)
    assert EventLogExporter(state, uri, batch_size=7).export() == {"events": 30, "impressions": 0}
    # More events (some ids seen before), a new exporter: only the new ones are added.
    state.write_events(events(25, 10))
    written += events(30, 5)
    assert EventLogExporter(state, uri, batch_size=7).export()["events"] == 5
    assert EventLogExporter(state, uri, batch_size=7).export()["events"] == 0
    assert logged_rows(uri) == as_rows(written)
    frame = read_event_log(uri)
    assert frame["ts"].is_monotonic_increasing and frame["event_id"].is_unique
    # Partitioned by the events' UTC dates, each row in its own date's folder.
    dates = {pd.Timestamp(e.timestamp, unit="s", tz="UTC").strftime("%Y-%m-%d") for e in written}
    assert {p.name for p in (root / "events").iterdir()} == {f"date={d}" for d in dates}
    for path in parquet_files(root / "events"):
        day = path.parent.name.removeprefix("date=")
        stamps = pq.read_table(path).column("ts").to_pylist()
        assert {pd.Timestamp(t, unit="s", tz="UTC").strftime("%Y-%m-%d") for t in stamps} == {day}


def test_a_crash_between_writing_and_committing_is_redone_not_doubled(state: OnlineState, tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    state.write_events(events(0, 20))
    crashed = EventLogExporter(state, uri, batch_size=12)
    pending = crashed.prepare("events")  # its files are written, then the process "dies"
    assert pending is not None and pending.count == 12 and all(Path(f).is_file() for f in pending.files)
    del crashed
    state.write_events(events(20, 10))  # more arrive before the restart
    restarted = EventLogExporter(state, uri, batch_size=12)
    assert restarted.committed("events") == ""
    redone = restarted.prepare("events")
    # Exactly the pending range again: same size, same files (overwritten), not a larger batch.
    assert redone is not None and (redone.after, redone.count, redone.last, redone.files) == (
        pending.after, pending.count, pending.last, pending.files)  # fmt: skip
    restarted.commit(redone)
    assert restarted.export()["events"] == 18
    assert logged_rows(uri) == as_rows(events(0, 30))
    assert read_event_log(uri)["event_id"].is_unique


KILLED_EXPORTER = """
import os, signal
from models.serving.event_log import EventLogExporter
batch = EventLogExporter(state, sys.argv[2], batch_size=12).prepare("events")
print(batch.count, len(batch.files), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # after the files, before the commit
"""


def test_an_exporter_killed_between_writing_and_committing_loses_and_doubles_nothing(
    online_store: StoreUnderTest, tmp_path: Path,
) -> None:  # fmt: skip
    uri = str(tmp_path / "log")
    state = online_store.open()
    try:
        state.write_events(events(0, 20))
        child = online_store.child(KILLED_EXPORTER, uri)
        out, _ = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL and out.split() == ["12", "3"]
        written = parquet_files(tmp_path / "log")
        assert len(written) == 3 and len(read_event_log(uri)) == 12  # in the log, not committed
        state.write_events(events(20, 10))
        assert EventLogExporter(state, uri, batch_size=12).export()["events"] == 30
        assert set(written) <= set(parquet_files(tmp_path / "log"))  # the same files, overwritten
        assert logged_rows(uri) == as_rows(events(0, 30))
    finally:
        state.close()


def test_a_journal_expired_after_export_leaves_the_log_whole(online_store: StoreUnderTest, tmp_path: Path) -> None:
    state = online_store.open(journal_s=DAY)
    try:
        uri = str(tmp_path / "log")
        state.write_events(events(0, 15))
        EventLogExporter(state, uri, batch_size=4).export()
        assert state.expire(time.time() + 2 * DAY).events == 15
        assert state.export_events("", 100) == ([], "")
        state.write_events(events(15, 3))
        assert EventLogExporter(state, uri, batch_size=4).export()["events"] == 3
        assert logged_rows(uri) == as_rows(events(0, 18))
    finally:
        state.close()


def test_impressions_are_logged_with_their_items_in_order(state: OnlineState, tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    shown = [Impression(f"r{i}", f"u{i}", tuple(f"i{j}" for j in range(i, i + 5)), "recsys-ranker:v1",
                        "champion" if i % 2 else "challenger", T0 + i * DAY / 2) for i in range(6)]  # fmt: skip
    for impression in shown:
        state.write_impression(impression)
    assert EventLogExporter(state, uri, batch_size=4).export() == {"events": 0, "impressions": 6}
    frame = read_impressions(uri)
    assert list(frame["recommendation_id"]) == [i.recommendation_id for i in shown]
    assert [tuple(items) for items in frame["items"]] == [i.items for i in shown]
    assert list(frame["variant"]) == [i.variant for i in shown]
    assert read_event_log(uri).empty and list(read_event_log(uri).columns)[:6] == [
        "event_id", "user_id", "item_id", "type", "ts", "value"]  # fmt: skip


def test_a_new_store_logs_beside_the_old_one_and_the_reader_keeps_an_id_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    old = SqliteState(tmp_path / "old.sqlite3", LIMITS)
    new = SqliteState(tmp_path / "new.sqlite3", LIMITS)
    try:
        old.write_events(events(0, 10))
        EventLogExporter(old, uri, batch_size=100).export()
        # The new store's cursors start again at the beginning: its files must not overwrite
        # the old ones. An id it shares with the old store (a late retry) is read once.
        new.write_events(events(5, 10))
        EventLogExporter(new, uri, batch_size=100).export()
        assert len(parquet_files(tmp_path / "log")) == 2 * 3  # two journals, three dates each
        assert logged_rows(uri) == as_rows(events(0, 15))
    finally:
        old.close()
        new.close()


def test_the_service_loop_exports_one_worker_at_a_time_and_once_more_at_stop(state: OnlineState,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    """Two loops on one journal (two API workers): a round finds the other's lock held and
    skips; the thread exports by itself; `stop` exports what came after the last round."""
    root = tmp_path / "log"
    first = ExportLoop(state, str(root), batch_size=7, interval_s=0.05, lock_dir=tmp_path)
    second = ExportLoop(state, str(root), batch_size=7, interval_s=3600, lock_dir=tmp_path)
    state.write_events(events(0, 10))
    with journal_lock(lock_path(state.journal_id, tmp_path), wait_s=0) as held:
        assert held
        assert second.run_once(wait_s=0) is None  # held by "another worker": skipped
    assert second.run_once(wait_s=0) == {"events": 10, "impressions": 0}
    first.start()
    state.write_events(events(10, 5))
    poll_until(lambda: len(read_event_log(str(root))), 10, "the loop's export", done=lambda n: n == 15)
    state.write_events(events(15, 3))
    first.stop(final_wait_s=5)  # the thread may or may not have taken these: the log has each once
    assert logged_rows(str(root)) == as_rows(events(0, 18))
    assert len(raw_event_ids(root)) == 18


def test_a_failed_round_is_counted_and_the_next_one_exports(state: OnlineState, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    loop = ExportLoop(state, str(blocker), batch_size=7, interval_s=3600, lock_dir=tmp_path)
    state.write_events(events(0, 4))
    assert loop.run_once(wait_s=0) is None
    blocker.unlink()
    assert loop.run_once(wait_s=0) == {"events": 4, "impressions": 0}


def raw_event_ids(root: Path) -> list[str]:
    """Every event id in the log's files, repeats kept (the reader drops them)."""
    return [i for f in parquet_files(root / "events") for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist()]
