"""Drift monitoring per model version: a reference profile saved at training time, cheap
vectorised counting of served feature rows and scores into the same bins, a sliding
window of time buckets per worker, and PSI / KS statistics over the merged counts.

No BentoML here: the service feeds `DriftCounter` and serves `drift_report`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.core.schema import FEATURE_NAMES, N_FEATURES

PROFILE_FILE = "reference_profile.json"
N_BINS = 10
_EPS = 1e-4  # smoothing: an empty bin must not make PSI infinite


@dataclass(frozen=True)
class ReferenceProfile:
    """Quantile bins and reference frequencies for each feature and for the score."""

    feature_edges: list[list[float]]  # interior edges per feature (len = bins - 1)
    feature_freqs: list[list[float]]
    score_edges: list[float]
    score_freqs: list[float]
    cold_start_share: float
    recommended_pop_edges: list[float]
    recommended_pop_freqs: list[float]
    n_rows: int

    def save(self, folder: Path) -> str:
        (folder / PROFILE_FILE).write_text(json.dumps(asdict(self)))
        return PROFILE_FILE

    @classmethod
    def load(cls, folder: Path) -> ReferenceProfile:
        return cls(**json.loads((folder / PROFILE_FILE).read_text()))

    def layout(self) -> BinLayout:
        return BinLayout([np.asarray(e) for e in self.feature_edges], np.asarray(self.score_edges))


def quantile_edges(values: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Interior edges at the quantiles; ties collapse (a binary feature gets one edge)."""
    if len(values) == 0:
        return np.zeros(0)
    return np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin i holds edges[i-1] < v <= edges[i]; the last bin is open above."""
    return np.searchsorted(edges, values, side="left")


def frequencies(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(bin_index(values, edges), minlength=len(edges) + 1).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def build_profile(
    features: np.ndarray, scores: np.ndarray, cold_start_share: float, recommended_pop: np.ndarray
) -> ReferenceProfile:
    """The profile of what the model scores on held-out traffic (its candidates' features
    and scores, the popularity of what it recommended)."""
    f_edges = [quantile_edges(features[:, j]) for j in range(features.shape[1])]
    s_edges = quantile_edges(scores)
    p_edges = quantile_edges(recommended_pop)
    return ReferenceProfile(
        feature_edges=[e.tolist() for e in f_edges],
        feature_freqs=[frequencies(features[:, j], e).tolist() for j, e in enumerate(f_edges)],
        score_edges=s_edges.tolist(),
        score_freqs=frequencies(scores, s_edges).tolist(),
        cold_start_share=float(cold_start_share),
        recommended_pop_edges=p_edges.tolist(),
        recommended_pop_freqs=frequencies(recommended_pop, p_edges).tolist(),
        n_rows=len(features),
    )


class BinLayout:
    """All bins of all features and the score in one flat vector, so one bincount counts a
    whole batch: [feature 0 bins | feature 1 bins | ... | score bins | requests | cold]."""

    def __init__(self, feature_edges: list[np.ndarray], score_edges: np.ndarray) -> None:
        if len(feature_edges) != N_FEATURES:
            raise ValueError(f"profile has {len(feature_edges)} features, the schema {N_FEATURES}")
        self.feature_edges = feature_edges
        self.score_edges = score_edges
        columns = [*feature_edges, score_edges]
        sizes = [len(e) + 1 for e in columns]
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.feature_offsets = offsets[: N_FEATURES + 1]
        self.score_offset = int(offsets[N_FEATURES])
        self.requests_slot = int(offsets[-1])
        self.cold_slot = self.requests_slot + 1
        self.size = self.cold_slot + 1
        # One searchsorted for all columns: column j is mapped monotonically into its own
        # interval [4j, 4j + 3] (values clipped to a span around its edges, which keeps every
        # bin), so all edges form one sorted array. Equal values map to equal values, so
        # ties with an edge land in the same bin as with a per-column search.
        lo = np.array([e[0] if len(e) else 0.0 for e in columns], dtype=np.float64)
        hi = np.array([e[-1] if len(e) else 0.0 for e in columns], dtype=np.float64)
        self._span = np.where(hi > lo, hi - lo, 1.0)
        self._low = lo - self._span
        self._high = hi + self._span
        self._base = 4.0 * np.arange(len(columns))
        self._edges = np.concatenate([self._map(np.asarray(e, dtype=np.float64), j) for j, e in enumerate(columns)])
        self._column_shift = np.arange(len(columns), dtype=np.int64)

    def _map(self, values: np.ndarray, j: int) -> np.ndarray:
        return (np.clip(values, self._low[j], self._high[j]) - self._low[j]) / self._span[j] + self._base[j]

    def count(self, features: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Counts of one batch of rows in the flat layout (vectorised, one search)."""
        x = np.empty((len(features), N_FEATURES + 1), dtype=np.float64)
        x[:, :N_FEATURES] = features
        x[:, N_FEATURES] = scores
        np.clip(x, self._low, self._high, out=x)
        x -= self._low
        x /= self._span
        x += self._base
        # position among all edges = edges of earlier columns + bin; flat slot adds one per column
        idx = np.searchsorted(self._edges, x, side="left") + self._column_shift
        return np.bincount(idx.ravel(), minlength=self.size)

    def feature_counts(self, flat: np.ndarray, j: int) -> np.ndarray:
        return flat[self.feature_offsets[j] : self.feature_offsets[j + 1]]

    def score_counts(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.score_offset : self.requests_slot]


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index between two frequency vectors over the same bins."""
    ref = np.asarray(reference, dtype=np.float64) + _EPS
    cur = np.asarray(current, dtype=np.float64)
    cur = cur / cur.sum() if cur.sum() > 0 else cur
    cur = cur + _EPS
    ref, cur = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_binned(reference: np.ndarray, current: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic on binned data: the largest gap between the CDFs."""
    cur = np.asarray(current, dtype=np.float64)
    if cur.sum() == 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(reference) - np.cumsum(cur / cur.sum()))))


class DriftCounter:
    """One worker's counts in time buckets (a ring), written to a shared folder by `flush`
    so that every worker can be merged. Bucket b covers [b*width, (b+1)*width).

    Rows are binned in batches of about `batch_rows`: a search over 200 rows cost about as
    much in fixed numpy overhead as in work (and a 1-row /score request nearly all overhead).
    Rows wait for their batch at most until their time bucket ends or the next `flush`, and
    are always counted in the bucket they arrived in.

    Thread-safe: the service adds rows on its event loop while `/drift` (a plain `def` API,
    run in a worker thread) flushes; one lock keeps the waiting rows and the counts whole."""

    def __init__(self, layout: BinLayout, folder: Path, name: str, window_s: float, n_buckets: int = 30,
                 batch_rows: int = 2048) -> None:  # fmt: skip
        self.layout = layout
        self.folder = folder
        self.width = window_s / n_buckets
        self.n_buckets = n_buckets
        self.batch_rows = batch_rows
        self.counts = np.zeros((n_buckets, layout.size), dtype=np.int64)
        self.bucket_ids = np.full(n_buckets, -1, dtype=np.int64)
        self.path = folder / f"{name}-{os.getpid()}.npz"
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []  # waiting to be binned
        self._rows_n = 0
        self._rows_bucket = -1
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def _slot(self, bucket: int) -> int:
        slot = bucket % self.n_buckets
        if self.bucket_ids[slot] != bucket:
            self.counts[slot] = 0
            self.bucket_ids[slot] = bucket
        return slot

    def add(self, features: np.ndarray, scores: np.ndarray, requests: int = 1, cold: int = 0,
            now: float | None = None) -> None:  # fmt: skip
        bucket = int((time.time() if now is None else now) // self.width)
        with self._lock:
            if self._rows and bucket != self._rows_bucket:
                self._bin_waiting()  # into their own bucket, before its slot can be reused
            slot = self._slot(bucket)
            self.counts[slot, self.layout.requests_slot] += requests
            self.counts[slot, self.layout.cold_slot] += cold
            if len(features):
                self._rows.append((features, scores))
                self._rows_n += len(features)
                self._rows_bucket = bucket
                if self._rows_n >= self.batch_rows:
                    self._bin_waiting()

    def requests(self) -> int:
        with self._lock:
            return int(self.counts[:, self.layout.requests_slot].sum())

    def _bin_waiting(self) -> None:
        if not self._rows:
            return
        features = np.concatenate([f for f, _ in self._rows])
        scores = np.concatenate([s for _, s in self._rows])
        self.counts[self._slot(self._rows_bucket)] += self.layout.count(features, scores)
        self._rows.clear()
        self._rows_n = 0

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the counts and bucket ids, every waiting row binned."""
        with self._lock:
            self._bin_waiting()
            return self.counts.copy(), self.bucket_ids.copy()

    def flush(self) -> None:
        """Write the counts for other workers to merge (atomically: write, then rename).
        The file is written outside the lock, so counting never waits for the disk."""
        counts, bucket_ids = self.snapshot()
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, counts=counts, bucket_ids=bucket_ids, width=self.width)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise


def merged_counts(folder: Path, size: int, window_s: float | None, window_rows: int | None,
                  now: float | None = None) -> tuple[np.ndarray, int]:  # fmt: skip
    """Sum the buckets of every worker file in `folder` that fall in the window: the last
    `window_s` seconds, or the newest buckets holding at least `window_rows` rows."""
    now = time.time() if now is None else now
    buckets: dict[int, np.ndarray] = {}
    width = None
    files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            width = float(data["width"])
            for bucket, row in zip(data["bucket_ids"], data["counts"]):
                if bucket >= 0:
                    buckets[int(bucket)] = buckets.get(int(bucket), 0) + row
    total = np.zeros(size, dtype=np.int64)
    if not buckets or width is None:
        return total, len(files)
    newest_first = sorted(buckets, reverse=True)
    if window_rows is not None:
        rows = 0
        for b in newest_first:
            total += buckets[b]
            rows += int(buckets[b][: size - 2].sum())
            if rows >= window_rows * (N_FEATURES + 1):
                break
    else:
        horizon = (now - (window_s or 0)) // width
        for b in newest_first:
            if b >= horizon:
                total += buckets[b]
    return total, len(files)


def status(value: float, warn: float, alert: float) -> str:
    return "alert" if value >= alert else "warn" if value >= warn else "ok"


def drift_report(profile: ReferenceProfile, counts: np.ndarray, warn: float, alert: float) -> dict[str, Any]:
    """PSI and status per feature and for the score, KS for the score, cold-start share."""
    layout = profile.layout()
    features = {}
    for j, name in enumerate(FEATURE_NAMES):
        value = psi(profile.feature_freqs[j], layout.feature_counts(counts, j))
        features[name] = {"psi": round(value, 5), "status": status(value, warn, alert)}
    score_counts = layout.score_counts(counts)
    score_psi = psi(profile.score_freqs, score_counts)
    requests = int(counts[layout.requests_slot])
    rows = int(score_counts.sum())
    return {
        "rows": rows,
        "requests": requests,
        "features": features,
        "score": {
            "psi": round(score_psi, 5),
            "status": status(score_psi, warn, alert),
            "ks": round(ks_binned(np.asarray(profile.score_freqs), score_counts), 5),
        },
        "cold_start_share": {
            "current": round(int(counts[layout.cold_slot]) / requests, 5) if requests else 0.0,
            "reference": profile.cold_start_share,
        },
        "thresholds": {"warn": warn, "alert": alert},
    }
