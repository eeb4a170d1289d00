"""The event log, for training: the online state's journals moved to a Parquet dataset
partitioned by date, each entry exactly once, even across crashes and restarts.

Layout under the log's root (a local folder, or any URL `pyarrow.fs.FileSystem.from_uri`
opens, e.g. s3://bucket/log):

    events/date=YYYY-MM-DD/part-<journal>-<after>-<last>.parquet      (UTC date of the event)
    impressions/date=YYYY-MM-DD/part-<journal>-<after>-<last>.parquet
    _export/<journal>-<kind>.json                                      (the exporter's cursor)

Exactly once: a batch is the journal's entries after the committed cursor. Before its files
are written, the exporter records the batch as pending (its cursor range and size) in the
cursor file; then it writes the files, named by that range; then it commits the new cursor.
A run that finds a pending batch (the last one crashed between the two) exports exactly that
range again, from the same cursor and of the same size, to the same file names: the files
are overwritten, never doubled, even if more events arrived meanwhile. The journal id in the
names keeps a new, empty state's cursors apart from an old one's. Every file and the cursor
appear whole or not at all (local: written aside, fsync'd and renamed; object stores: one PUT).

One exporter at a time per journal (run it from one process, e.g. one API worker or a job).
The reader drops repeated event ids (an id retried after the state's retention would come
back as new).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.lifecycle.store import fsync_path
from models.serving.events import Event, Impression
from models.serving.online.base import START, Cursor, JournalKind, OnlineState

EVENT_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()), ("type", pa.string()),
    ("ts", pa.float64()), ("value", pa.float64()), ("recommendation_id", pa.string()),
])  # fmt: skip
IMPRESSION_SCHEMA = pa.schema([
    ("recommendation_id", pa.string()), ("user_id", pa.string()), ("items", pa.list_(pa.string())),
    ("model_version", pa.string()), ("variant", pa.string()), ("ts", pa.float64()),
])  # fmt: skip
# The partition column; a string, so that reading never guesses a type for it.
PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
KINDS: tuple[JournalKind, ...] = ("events", "impressions")


def open_log(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and root path of a log: a URL (s3://..., file://...) or a local path."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _put(fs: pafs.FileSystem, path: str, write: Any) -> None:
    """Make `path` appear whole or not at all, durably. `write(fs, path)` writes a file.
    Local: written beside under a name readers skip ('.' prefix), fsync'd, renamed, and the
    folder fsync'd (the rename itself must survive a power loss). Object stores: one PUT is
    atomic already."""
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    if not _is_local(fs):
        write(fs, path)
        return
    aside = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        write(fs, aside)
        fsync_path(aside)
        fs.move(aside, path)
    finally:
        if os.path.exists(aside):
            os.unlink(aside)
    fsync_path(parent)
    fsync_path(posixpath.dirname(parent))  # a date folder new to its parent


def _date(ts: float) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d")


def _events_table(events: list[Event]) -> pa.Table:
    return pa.table({
        "event_id": [e.event_id for e in events], "user_id": [e.user_id for e in events],
        "item_id": [e.item_id for e in events], "type": [e.type for e in events],
        "ts": [e.timestamp for e in events], "value": [e.value for e in events],
        "recommendation_id": [e.recommendation_id for e in events],
    }, schema=EVENT_SCHEMA)  # fmt: skip


def _impressions_table(impressions: list[Impression]) -> pa.Table:
    return pa.table({
        "recommendation_id": [i.recommendation_id for i in impressions],
        "user_id": [i.user_id for i in impressions], "items": [list(i.items) for i in impressions],
        "model_version": [i.model_version for i in impressions], "variant": [i.variant for i in impressions],
        "ts": [i.timestamp for i in impressions],
    }, schema=IMPRESSION_SCHEMA)  # fmt: skip


@dataclass(frozen=True)
class PendingBatch:
    """A batch whose files may be (partly) written but whose cursor is not committed."""

    kind: JournalKind
    after: Cursor
    count: int
    last: Cursor
    files: tuple[str, ...] = ()


class EventLogExporter:
    """Moves one state's journals to the log. `export()` until nothing is left; `prepare` and
    `commit` are its two halves (a crash can only fall between or inside them)."""

    def __init__(self, state: OnlineState, uri: str, batch_size: int) -> None:
        self.state, self.batch_size = state, batch_size
        self.fs, self.root = open_log(uri)

    def _cursor_path(self, kind: JournalKind) -> str:
        return posixpath.join(self.root, "_export", f"{self.state.journal_id}-{kind}.json")

    def _read_cursor(self, kind: JournalKind) -> dict[str, Any]:
        path = self._cursor_path(kind)
        try:
            with self.fs.open_input_stream(path) as f:
                return dict(json.loads(f.read()))
        except FileNotFoundError:
            return {"committed": START, "pending": None}

    def _write_cursor(self, kind: JournalKind, committed: Cursor, pending: PendingBatch | None) -> None:
        body = {"committed": committed, "pending": None if pending is None else
                {"after": pending.after, "count": pending.count, "last": pending.last}}  # fmt: skip
        data = json.dumps(body).encode()

        def write(fs: pafs.FileSystem, path: str) -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        _put(self.fs, self._cursor_path(kind), write)

    def committed(self, kind: JournalKind) -> Cursor:
        return str(self._read_cursor(kind)["committed"])

    def _read_journal(self, kind: JournalKind, after: Cursor, limit: int) -> tuple[list[Any], Cursor]:
        if kind == "events":
            return self.state.export_events(after, limit)  # type: ignore[return-value]
        return self.state.export_impressions(after, limit)  # type: ignore[return-value]

    def prepare(self, kind: JournalKind) -> PendingBatch | None:
        """Record the next batch as pending and write its files; None when nothing is new.
        A batch left pending by an earlier run is redone exactly."""
        cursor = self._read_cursor(kind)
        pending = cursor["pending"]
        if pending is not None:
            after, count = str(pending["after"]), int(pending["count"])
            entries, last = self._read_journal(kind, after, count)
            if len(entries) != count or last != pending["last"]:
                raise RuntimeError(
                    f"{self._cursor_path(kind)}: the pending batch after {after!r} had {count} entries up to "
                    f"{pending['last']!r}; the journal now gives {len(entries)} up to {last!r} (was it expired "
                    "before its export was committed?)"
                )  # fmt: skip
        else:
            after = str(cursor["committed"])
            entries, last = self._read_journal(kind, after, self.batch_size)
            if not entries:
                return None
            self._write_cursor(kind, after, PendingBatch(kind, after, len(entries), last))
        files = self._write_files(kind, entries, after, last)
        return PendingBatch(kind, after, len(entries), last, files)

    def _write_files(self, kind: JournalKind, entries: list[Any], after: Cursor, last: Cursor) -> tuple[str, ...]:
        table = _events_table(entries) if kind == "events" else _impressions_table(entries)
        dates = pa.array([_date(e.timestamp) for e in entries], pa.string())
        name = f"part-{self.state.journal_id}-{after or '0'}-{last}.parquet"
        written = []
        for date in sorted(set(dates.to_pylist())):
            part = table.filter(pc.equal(dates, date))
            path = posixpath.join(self.root, kind, f"date={date}", name)
            _put(self.fs, path, lambda fs, p, part=part: pq.write_table(part, p, filesystem=fs))
            written.append(path)
        return tuple(written)

    def commit(self, batch: PendingBatch) -> None:
        """The batch's files are durable: move the cursor past it, and let the state expire it."""
        self._write_cursor(batch.kind, batch.last, None)
        self.state.mark_exported(batch.kind, batch.last)

    def export(self) -> dict[str, int]:
        """Export every journal entry not yet in the log; the number exported per kind."""
        counts = dict.fromkeys(KINDS, 0)
        for kind in KINDS:
            while (batch := self.prepare(kind)) is not None:
                self.commit(batch)
                counts[kind] += batch.count
        return counts


def _read(uri: str, kind: JournalKind, schema: pa.Schema) -> pd.DataFrame:
    fs, root = open_log(uri)
    base = posixpath.join(root, kind)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return schema.empty_table().append_column("date", pa.array([], pa.string())).to_pandas()
    dataset = ds.dataset(base, filesystem=fs, format="parquet", partitioning=PARTITIONING, schema=schema.append(
        pa.field("date", pa.string())))  # fmt: skip
    return dataset.to_table().to_pandas()


def read_event_log(uri: str) -> pd.DataFrame:
    """Every logged event, once (a repeated event_id keeps its first), oldest first: columns
    event_id, user_id, item_id, type, ts (epoch seconds, float), value (the rating of a rating
    event; NaN when none), recommendation_id, date (the partition, UTC)."""
    frame = _read(uri, "events", EVENT_SCHEMA)
    frame = frame.sort_values(["ts", "event_id"], kind="stable").drop_duplicates("event_id", keep="first")
    return frame.reset_index(drop=True)


def read_impressions(uri: str) -> pd.DataFrame:
    """Every logged impression: recommendation_id, user_id, items (in the order shown),
    model_version, variant, ts, date."""
    frame = _read(uri, "impressions", IMPRESSION_SCHEMA)
    return frame.sort_values(["ts", "recommendation_id"], kind="stable").reset_index(drop=True)
