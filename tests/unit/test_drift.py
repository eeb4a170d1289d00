"""Drift statistics and counting: PSI and KS against known cases, vectorised counting in
the flat layout, time buckets and merging of several workers' files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.core.drift import (
    DriftCounter,
    ReferenceProfile,
    bin_index,
    build_profile,
    drift_report,
    ks_binned,
    merged_counts,
    psi,
    quantile_edges,
)
from models.core.schema import FEATURE_NAMES, N_FEATURES

RNG = np.random.default_rng(0)
REFERENCE = RNG.normal(size=(5000, N_FEATURES)).astype(np.float32)
REF_SCORES = RNG.normal(size=5000).astype(np.float32)


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return build_profile(REFERENCE, REF_SCORES, cold_start_share=0.0, recommended_pop=RNG.random(100))


def test_psi_known_values() -> None:
    assert psi([0.5, 0.5], [50, 50]) == pytest.approx(0.0, abs=1e-9)
    # (0.9-0.5)ln(0.9/0.5) + (0.1-0.5)ln(0.1/0.5)
    assert psi([0.5, 0.5], [90, 10]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5), rel=1e-3)


@given(st.lists(st.floats(0.01, 1), min_size=2, max_size=12), st.lists(st.integers(0, 100), min_size=2, max_size=12))
def test_psi_and_ks_are_non_negative(ref: list[float], cur: list[int]) -> None:
    n = min(len(ref), len(cur))
    ref_arr = np.asarray(ref[:n]) / sum(ref[:n])
    assert psi(ref_arr, cur[:n]) >= -1e-12
    assert 0 <= ks_binned(ref_arr, np.asarray(cur[:n])) <= 1 + 1e-9


def test_quantile_edges_and_bins() -> None:
    edges = quantile_edges(np.arange(100, dtype=float))
    assert len(edges) == 9
    assert bin_index(np.array([-1.0, 1000.0]), edges).tolist() == [0, 9]
    assert len(quantile_edges(np.array([0.0, 1.0] * 50))) <= 3  # binary: ties collapse


def test_layout_counts_every_row_once(profile: ReferenceProfile) -> None:
    layout = profile.layout()
    counts = layout.count(REFERENCE[:300], REF_SCORES[:300])
    for j in range(N_FEATURES):
        assert layout.feature_counts(counts, j).sum() == 300
    assert layout.score_counts(counts).sum() == 300


def test_same_distribution_no_alert_shifted_feature_alerts(profile: ReferenceProfile) -> None:
    layout = profile.layout()
    same = layout.count(RNG.normal(size=(3000, N_FEATURES)).astype(np.float32), RNG.normal(size=3000))
    report = drift_report(profile, same, warn=0.1, alert=0.25)
    assert all(f["status"] == "ok" for f in report["features"].values())
    shifted_rows = RNG.normal(size=(3000, N_FEATURES)).astype(np.float32)
    shifted_rows[:, 4] += 2.0
    report = drift_report(profile, layout.count(shifted_rows, RNG.normal(size=3000)), 0.1, 0.25)
    statuses = {name: f["status"] for name, f in report["features"].items()}
    assert statuses.pop(FEATURE_NAMES[4]) == "alert"
    assert set(statuses.values()) == {"ok"}


def test_workers_merge_and_old_buckets_leave_the_window(profile: ReferenceProfile, tmp_path: Path) -> None:
    layout = profile.layout()
    now = 1_000_000.0
    a = DriftCounter(layout, tmp_path, "api-a", window_s=60, n_buckets=6)
    b = DriftCounter(layout, tmp_path, "api-b", window_s=60, n_buckets=6)
    a.path, b.path = tmp_path / "a.npz", tmp_path / "b.npz"  # same pid in a test: name the files
    a.add(REFERENCE[:100], REF_SCORES[:100], now=now - 120)  # out of the 60 s window by then
    a.add(REFERENCE[:70], REF_SCORES[:70], now=now - 15)
    b.add(REFERENCE[:30], REF_SCORES[:30], cold=1, now=now - 1)
    a.flush()
    b.flush()
    counts, workers = merged_counts(tmp_path, layout.size, window_s=60, window_rows=None, now=now)
    assert workers == 2
    assert layout.score_counts(counts).sum() == 100
    assert counts[layout.requests_slot] == 2 and counts[layout.cold_slot] == 1
    by_rows, _ = merged_counts(tmp_path, layout.size, window_s=None, window_rows=30, now=now)
    assert layout.score_counts(by_rows).sum() == 30  # newest bucket alone holds 30 rows


@pytest.mark.parametrize("batch_rows", [7, 2048])
def test_rows_binned_in_batches_count_as_binned_one_request_at_a_time(
    profile: ReferenceProfile, tmp_path: Path, batch_rows: int
) -> None:
    """Batched binning (DriftCounter.batch_rows) puts every row in the bucket it arrived in,
    across bucket changes and ring wrap-around, exactly like binning each request at once."""
    layout = profile.layout()
    each = DriftCounter(layout, tmp_path / "each", "api", window_s=60, n_buckets=6, batch_rows=1)
    batched = DriftCounter(layout, tmp_path / "batched", "api", window_s=60, n_buckets=6, batch_rows=batch_rows)
    rng = np.random.default_rng(batch_rows)
    now = 1_000_000.0
    for _ in range(400):
        now += float(rng.exponential(0.5))  # ~200 s: the 6 buckets of 10 s wrap around
        n = int(rng.integers(0, 40))
        start = int(rng.integers(0, len(REFERENCE) - n))
        cold = int(rng.integers(0, 2))
        for counter in (each, batched):
            counter.add(REFERENCE[start : start + n], REF_SCORES[start : start + n], cold=cold, now=now)
    each.flush()
    batched.flush()
    np.testing.assert_array_equal(batched.bucket_ids, each.bucket_ids)
    np.testing.assert_array_equal(batched.counts, each.counts)
    assert batched.counts[:, layout.score_offset : layout.requests_slot].sum() > 0


def test_profile_round_trips_as_json(profile: ReferenceProfile, tmp_path: Path) -> None:
    profile.save(tmp_path)
    assert ReferenceProfile.load(tmp_path) == profile


def _count_per_column(layout, features: np.ndarray, scores: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The plain reference: one search per column."""
    flat = np.zeros(layout.size, dtype=np.int64)
    for j, edges in enumerate(layout.feature_edges):
        np.add.at(flat, bin_index(features[:, j], edges) + layout.feature_offsets[j], 1)
    np.add.at(flat, bin_index(scores, layout.score_edges) + layout.score_offset, 1)
    return flat


@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 1e3, 1e9]))
def test_one_search_counts_like_one_search_per_column(seed: int, n: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    reference = np.round(rng.normal(size=(400, N_FEATURES)) * 3) / 3  # ties, like real features
    profile = build_profile(reference.astype(np.float32), rng.normal(size=400).astype(np.float32), 0.0, rng.random(10))
    layout = profile.layout()
    # values on the edges, between them and far outside them
    features = np.vstack([reference[rng.integers(0, 400, n)], rng.normal(size=(n, N_FEATURES)) * scale]).astype(np.float32)
    scores = np.concatenate([rng.normal(size=n), rng.normal(size=n) * scale]).astype(np.float32)
    assert (layout.count(features, scores) == _count_per_column(layout, features, scores)).all()


def test_counting_and_flushing_at_once_lose_no_row(profile: ReferenceProfile, tmp_path: Path) -> None:
    """`/drift` flushes in a worker thread while the event loop adds rows: no shape error,
    and every added row is counted once."""
    import sys
    import threading

    layout = profile.layout()
    counter = DriftCounter(layout, tmp_path, "api", window_s=3600, n_buckets=2, batch_rows=64)
    n_adds, errors = 4000, []
    done = threading.Event()

    def flush_often() -> None:
        try:
            while not done.is_set():
                counter.flush()
        except (ValueError, OSError) as err:  # the failure this test is about
            errors.append(err)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
    flusher = threading.Thread(target=flush_often)
    flusher.start()
    try:
        for i in range(n_adds):
            counter.add(REFERENCE[i : i + 1], REF_SCORES[i : i + 1], now=1_000_000.0)
    finally:
        done.set()
        flusher.join()
        sys.setswitchinterval(old)
    counter.flush()
    assert not errors, errors[0]
    counts, _ = counter.snapshot()
    per_feature = counts.sum(axis=0)[layout.feature_offsets[0] : layout.feature_offsets[1]].sum()
    assert per_feature == n_adds, f"counted {per_feature} rows, added {n_adds}"
    assert counter.requests() == n_adds
