"""The service side of drift monitoring: count every scored request (models/core/drift.py),
keep Prometheus gauges of PSI per feature and model version, and log a sample of inputs
and outputs through `bentoml.monitor` to rotating files for offline reports."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from models.core.drift import INSUFFICIENT, DriftCounter, ReferenceProfile, drift_report, merged_counts
from models.lifecycle.store import pid_alive
from models.serving.settings import RecsysSettings

log = logging.getLogger("recsys.monitoring")
MONITOR_NAME = "recsys_ranking"
_GAUGE_REFRESH_S = 10.0


@functools.cache
def _psi_gauge() -> Any:
    """One gauge per process, shared by the monitors of the champion and the challenger."""
    return bentoml.metrics.Gauge(
        name="recsys_drift_psi",
        documentation="PSI of served feature rows (and scores) against the model's reference profile",
        labelnames=["feature", "model_version"],
        multiprocess_mode="mostrecent",
    )


@functools.cache
def _flush_errors() -> Any:
    return bentoml.metrics.Counter(
        name="recsys_drift_flush_errors_total",
        documentation="Failed writes or merges of drift counts, by model version and error type",
        labelnames=["model_version", "error"],
    )


@functools.cache
def monitor_log_errors() -> Any:
    return bentoml.metrics.Counter(
        name="recsys_monitor_log_errors_total",
        documentation="Monitor-log records not written (queue_full, write_failed, unwritable_dir), by monitor",
        labelnames=["monitor", "reason"],
    )


# What writing our counts or reading the other workers' can raise: the disk (full,
# unwritable, the folder removed) and a damaged file (np.load). Anything else is a bug, and
# the flusher's done-callback logs it.
COUNT_FILE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def remove_dead_owners(drift_dir: Path) -> None:
    """Drift folders of serve processes that are gone, and in the live ones the count files
    of workers that are gone: they would count as workers in /drift forever."""
    if not drift_dir.is_dir():
        return
    for serve in drift_dir.iterdir():
        if serve.is_dir() and serve.name.isdigit() and not pid_alive(int(serve.name)):
            shutil.rmtree(serve, ignore_errors=True)
            continue
        for path in serve.glob("*/*.npz"):
            pid = path.stem.rpartition("-")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)


class DriftMonitor:
    """One per worker. Counts go to a folder shared by every worker of this serve process
    (keyed by the serve process id and the model version), so reports are per service.

    Counting is supervised: a failed write or merge is logged once (until it works again),
    counted in `recsys_drift_flush_errors_total`, and shown in the report as
    `counting.ok = false`; the flusher keeps going."""

    def __init__(self, settings: RecsysSettings, model_tag: str, model_folder: Path, role: str) -> None:
        self.settings = settings
        self.model_tag = model_tag
        self.profile = ReferenceProfile.load(model_folder)
        remove_dead_owners(settings.drift_dir)
        self.folder = settings.drift_dir / str(os.getppid()) / model_tag.replace(":", "-")
        self.counter = DriftCounter(self.profile.layout(), self.folder, role, settings.drift_window_s,
                                    rows_per_s=settings.drift_rows_per_s)  # fmt: skip
        self._gauge_at = 0.0
        self._psi = _psi_gauge()
        self._sample = random.Random()
        self._failure: str | None = None  # the current streak's first error
        self._failures = 0

    async def flush_forever(self, every_s: float = 1.0) -> None:
        """Write this worker's counts every second while they change, so that a merged
        report is at most a second behind, also for workers that stopped getting requests;
        refresh the gauges every few seconds. Off the request path."""
        last = -1
        while True:
            await asyncio.sleep(every_s)
            total = self.counter.requests()
            # Disk work (the write, and the report's merge of every worker's file) in a
            # thread: the counter is thread-safe, and the loop keeps serving meanwhile.
            if total != last and await asyncio.to_thread(self._flush):
                last = total
            now = time.time()
            if self.settings.drift_enabled and now - self._gauge_at >= _GAUGE_REFRESH_S:
                self._gauge_at = now
                await asyncio.to_thread(self.report)

    def start_flusher(self) -> asyncio.Task[None]:
        """The flusher as a task whose unexpected end is an ERROR in the log, not silence."""
        task = asyncio.get_running_loop().create_task(self.flush_forever())
        task.add_done_callback(self._flusher_ended)
        return task

    def _flusher_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            self._failed(err)
            log.error("drift counting of %s stopped: %r", self.model_tag, err, exc_info=err)

    def _flush(self) -> bool:
        try:
            self.counter.flush()
        except COUNT_FILE_ERRORS as err:
            self._failed(err)
            return False
        self._recovered()
        return True

    def _failed(self, err: BaseException) -> None:
        _flush_errors().labels(model_version=self.model_tag, error=type(err).__name__).inc()
        self._failures += 1
        if self._failure is None:
            self._failure = f"{type(err).__name__}: {err}"
            log.error("drift counting of %s is impaired (%s under %s); it keeps trying",
                      self.model_tag, self._failure, self.folder)  # fmt: skip

    def _recovered(self) -> None:
        if self._failure is not None:
            log.warning("drift counting of %s works again after %d failures", self.model_tag, self._failures)
            self._failure = None

    def counting(self) -> dict[str, Any]:
        return {"ok": self._failure is None, "error": self._failure, "failures": self._failures}

    def observe(self, features: np.ndarray, scores: np.ndarray, cold: bool, endpoint: str,
                online: int = 0, warmed: bool = False) -> None:  # fmt: skip
        """`online`: how many of the user's online items (events) the request used; `warmed`:
        the user was unknown at training time and is known through them."""
        if not self.settings.drift_enabled:
            return
        self.counter.add(features, scores, cold=int(cold), online=online, warmed=int(warmed))
        if self.settings.monitor_sample and self._sample.random() < self.settings.monitor_sample:
            self._log(features, scores, cold, endpoint, online)

    def _log(self, features: np.ndarray, scores: np.ndarray, cold: bool, endpoint: str, online: int = 0) -> None:
        options = {"log_path": str(self.settings.monitor_dir)}
        with bentoml.monitor(MONITOR_NAME, monitor_class="default", monitor_options=options) as mon:
            # BentoML knows the roles feature/prediction/target only: context goes in as features.
            mon.log(self.model_tag, name="model_version", role="feature", data_type="categorical")
            mon.log(endpoint, name="endpoint", role="feature", data_type="categorical")
            mon.log(bool(cold), name="cold_start", role="feature", data_type="categorical")
            mon.log(int(online), name="online_items", role="feature", data_type="numerical")
            # Unrounded: bin edges are data values, and rounding would move values across them.
            mon.log(np.asarray(features).tolist(), name="features", role="feature",
                    data_type="numerical_sequence")  # fmt: skip
            mon.log(np.asarray(scores).tolist(), name="scores", role="prediction",
                    data_type="numerical_sequence")  # fmt: skip

    def report(self) -> dict[str, Any]:
        """Merge every worker's counts in the window, compute the statistics, set gauges.
        With counting impaired, the report is of what the files hold, and says so."""
        if not self.settings.drift_enabled:
            return {"model_version": self.model_tag, "enabled": False}
        self._flush()
        s = self.settings
        try:
            counts, workers = merged_counts(self.folder, self.counter.layout, s.drift_window_s, s.drift_window_rows)
        except COUNT_FILE_ERRORS as err:
            self._failed(err)
            counts, workers = np.zeros(self.counter.layout.size, dtype=np.int64), 0
        report = drift_report(self.profile, counts, s.drift_warn, s.drift_alert, s.drift_min_rows)
        for name, values in [*report["features"].items(), ("__score__", report["score"])]:
            self._psi.labels(feature=name, model_version=self.model_tag).set(gauge_value(values))
        window = {"rows": s.drift_window_rows} if s.drift_window_rows else {"seconds": s.drift_window_s}
        return {"model_version": self.model_tag, "window": window, "workers": workers,
                "counting": self.counting(), **report}  # fmt: skip


def gauge_value(statistic: dict[str, Any]) -> float:
    """The PSI for the gauge; NaN while the sample is too small: no alert rule on the gauge
    may fire on noise (NaN >= 0.25 is false in PromQL)."""
    return float("nan") if statistic["status"] == INSUFFICIENT else float(statistic["psi"])


def logged_records(logs: Path, name: str, model_tag: str, hint: str = "") -> Iterator[dict[str, Any]]:
    """The records that `bentoml.monitor(name)` wrote under `logs` (its log_path) for
    `model_tag`, every worker's files, oldest first. FileNotFoundError if there are none."""
    files = sorted((logs / name / "data").glob("data.*.log*"))
    if not files:
        raise FileNotFoundError(f"{logs}: no {name}/data/data.*.log files (is RECSYS_MONITOR_DIR right?{hint})")
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("model_version") == model_tag:
                    yield record
