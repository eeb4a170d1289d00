"""The event-log exporter inside the service: every API worker runs an `ExportLoop`, a
thread that every `interval_s` exports the online state's journals to the Parquet log
(event_log.py) and then expires old state, and once more at shutdown.

One exporter at a time per journal (event_log.py's rule): a run first takes an exclusive
`flock` on a file named by the journal's id, without waiting; a worker that finds it held
skips that round (another worker is exporting the same journal). The kernel releases the
lock when its holder dies, even by `kill -9`, and the next run redoes a batch left pending.
The lock is per machine: with Redis shared by replicas on several machines, let one replica
export (RECSYS_EVENT_LOG_INTERVAL_S=0 on the others).

Off the event loop: exports and expiry block on disk and on the backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml

from models.serving.event_log import EventLogExporter
from models.serving.online import BackendUnavailable, OnlineState

log = logging.getLogger("recsys.event_log")
# How often a waiting run (the shutdown's) tries the lock again.
_LOCK_POLL_S = 0.05


@functools.cache
def _metrics() -> dict[str, Any]:
    """Created once per process (a second registration of a name is an error)."""
    return {
        "exported": bentoml.metrics.Counter(
            name="recsys_event_log_exported_total",
            documentation="Journal entries written to the Parquet event log, by kind (events, impressions)",
            labelnames=["kind"],
        ),
        "failures": bentoml.metrics.Counter(
            name="recsys_event_log_failures_total",
            documentation="Export rounds that failed (retried at the next round), by reason",
            labelnames=["reason"],
        ),
    }


def lock_path(journal_id: str, folder: Path | None = None) -> Path:
    """The lock file of one journal (on this machine)."""
    return (folder or Path(tempfile.gettempdir())) / f"recsys-export-{journal_id}.lock"


@contextlib.contextmanager
def journal_lock(path: Path, wait_s: float) -> Iterator[bool]:
    """Hold the exclusive lock of `path` for the block; yields False (and holds nothing) when
    another process or thread holds it for longer than `wait_s` (0: do not wait)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(_LOCK_POLL_S)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class ExportLoop:
    """Exports one worker's view of the online state to the log, periodically and at stop."""

    def __init__(self, state: OnlineState, uri: str, batch_size: int, interval_s: float,
                 lock_dir: Path | None = None) -> None:  # fmt: skip
        if interval_s <= 0:
            raise ValueError(f"interval_s {interval_s!r}: must be > 0 (0 turns the loop off: do not make one)")
        self.state, self.interval_s = state, interval_s
        self.exporter = EventLogExporter(state, uri, batch_size)
        self._lock_dir = lock_dir
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_logged: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recsys-event-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once(wait_s=0)

    def run_once(self, wait_s: float) -> dict[str, int] | None:
        """One round: export everything not yet in the log, then expire. The counts exported
        per kind; None when another exporter held the journal or the round failed (counted in
        recsys_event_log_failures_total, logged once per reason; the next round retries)."""
        try:
            path = lock_path(self.state.journal_id, self._lock_dir)
            with journal_lock(path, wait_s) as held:
                if not held:
                    return None
                counts = self.exporter.export()
                self.state.expire(time.time())
        except BackendUnavailable as err:
            self._failed("unavailable", err)
            return None
        except OSError as err:  # the log's folder or object store (pyarrow raises OSError subclasses)
            self._failed("storage", err)
            return None
        except RuntimeError as err:  # a pending batch that cannot be redone (event_log.py says why)
            self._failed("pending_batch", err)
            return None
        for kind, n in counts.items():
            _metrics()["exported"].labels(kind=kind).inc(n)
        return counts

    def _failed(self, reason: str, err: Exception) -> None:
        _metrics()["failures"].labels(reason=reason).inc()
        if reason not in self._failures_logged:
            self._failures_logged.add(reason)
            log.warning("event log export failed (%s): %s (logged once per reason; counted in "
                        "recsys_event_log_failures_total; retried every %g s)", reason, err, self.interval_s)  # fmt: skip

    def stop(self, final_wait_s: float) -> dict[str, int] | None:
        """Stop the thread, then export once more, waiting up to `final_wait_s` for the lock
        (the other workers stop at the same time: the last one finds nothing left)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.run_once(wait_s=final_wait_s)
