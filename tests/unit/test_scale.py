"""The pieces of training at scale: lean row sampling, a window cut to fewer labelled users,
the co-occurrence index built in blocks, the QuantileDMatrix built from batches, and the
stage log's time and memory summary."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xgboost as xgb

from models.core import retrieval
from models.core.interactions import InteractionLog
from models.core.params import CandidateParams
from models.core.tables import build_cooc_index
from tests.unit.test_split import random_log
from training.groups import Groups
from training.pipeline import StageLog
from training.ranker import GroupBatches
from training.rows import RowSampling, sampling_grid
from training.split import SplitConfig, sample_label_users, window


@pytest.mark.parametrize(("hard", "random"), [(0, 0), (0, 5), (3, 0), (3, 5), (50, 50)])
def test_sampling_keeps_every_positive_the_top_negatives_and_random_others(hard: int, random: int) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.1).astype(np.float32)
    kept = RowSampling(hard, random).select(y, rng)
    negatives = np.flatnonzero(y == 0)
    assert np.all(np.diff(kept) > 0)  # ascending, no repeats: candidate order is kept
    assert set(np.flatnonzero(y > 0)) <= set(kept.tolist())
    assert set(negatives[:hard]) <= set(kept.tolist())
    others = set(kept.tolist()) - set(np.flatnonzero(y > 0)) - set(negatives[:hard].tolist())
    assert others <= set(negatives[hard:].tolist())
    assert len(others) == min(random, max(len(negatives) - hard, 0))


def test_full_sampling_keeps_every_row_and_bad_rates_name_the_field() -> None:
    y = np.array([0, 1, 0, 0], dtype=np.float32)
    assert RowSampling().select(y, np.random.default_rng(0)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="hard and random must be >= 0"):
        RowSampling(-1, 2)


@pytest.mark.parametrize("k", [5, 10, 20])
def test_the_sampling_grid_is_relative_to_k_and_never_hard_negatives_alone(k: int) -> None:
    grid = sampling_grid(k)
    assert all(s.random >= 2 * k for s in grid)  # every sampling keeps uniform negatives
    assert {s.random for s in grid} == {2 * k, 4 * k, 8 * k}


@pytest.mark.parametrize("n", [1, 7, 10_000])
def test_a_window_cut_to_n_users_keeps_their_own_labels(n: int) -> None:
    log = random_log(seed=1, n_users=80, max_per_user=30)
    full = window(log, 1, SplitConfig())
    cut = sample_label_users(full, n, np.random.default_rng(0))
    assert len(cut.label_users) == min(n, len(full.label_users))
    position = {int(u): j for j, u in enumerate(full.label_users)}
    for j, user in enumerate(cut.label_users.tolist()):
        mine = cut.label_items[cut.label_indptr[j] : cut.label_indptr[j + 1]]
        f = position[user]
        assert mine.tolist() == full.label_items[full.label_indptr[f] : full.label_indptr[f + 1]].tolist()


@pytest.mark.parametrize("block_entries", [1, 100, 5_000])
def test_the_cooccurrence_index_is_the_same_in_any_number_of_blocks(block_entries: int) -> None:
    log = random_log(seed=2, n_users=120, max_per_user=40)
    params = CandidateParams(cooc_window=4, cooc_neighbors=7)
    whole = build_cooc_index(log, 100, params, block_entries=10**9)
    blocked = build_cooc_index(log, 100, params, block_entries=block_entries)
    assert len(whole[1]) > 0
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.diff(whole[0]).max() <= 7


def _cooc_by_hand(
    user: np.ndarray, item: np.ndarray, n_items: int, window: int, keep: int
) -> dict[int, list[tuple[float, int]]]:
    """The co-occurrence index computed another way: a dict of pair weights, pair by pair."""
    total: dict[tuple[int, int], float] = {}
    for p in range(len(user)):
        for q in range(p + 1, min(p + window + 1, len(user))):
            if user[q] == user[p] and item[q] != item[p]:
                for a, b in ((item[p], item[q]), (item[q], item[p])):
                    total[int(a), int(b)] = total.get((int(a), int(b)), 0.0) + 1.0 / (q - p)
    count = np.bincount(item, minlength=n_items)
    rows: dict[int, list[tuple[float, int]]] = {}
    for (a, b), w in total.items():
        rows.setdefault(a, []).append((-np.float32(w / np.sqrt(count[a] * count[b])), b))  # saved as float32
    return {a: sorted(entries)[:keep] for a, entries in rows.items()}


@pytest.mark.parametrize(
    ("seed", "window", "keep", "repeats"), [(3, 1, 5, False), (4, 3, 7, True), (5, 10, 100, True)]
)
def test_the_cooccurrence_index_equals_pair_weights_counted_by_hand(
    seed: int, window: int, keep: int, repeats: bool
) -> None:
    log = random_log(seed=seed, n_users=40, max_per_user=25)
    if repeats:  # an item again in the same timeline: pairs of an item with itself are left out
        rng = np.random.default_rng(seed)
        log = InteractionLog(log.user, rng.integers(0, 12, len(log)).astype(np.int32), log.ts, log.rating,
                             log.user_ids)  # fmt: skip
    params = CandidateParams(cooc_window=window, cooc_neighbors=keep)
    indptr, items, scores = build_cooc_index(log, 100, params, block_entries=300)
    expected = _cooc_by_hand(log.user, log.item, 100, window, keep)
    assert len(expected) > 0
    for a in range(100):
        row = slice(indptr[a], indptr[a + 1])
        want = expected.get(a, [])
        assert items[row].tolist() == [b for _, b in want]
        np.testing.assert_allclose(scores[row], [-s for s, _ in want], rtol=1e-6)


def test_a_quantile_matrix_from_batches_holds_every_row_in_qid_order() -> None:
    rng = np.random.default_rng(3)
    groups = Groups()
    for g in range(40):
        n = int(rng.integers(5, 30))
        groups.add(rng.random((n, 4)).astype(np.float32), (rng.random(n) < 0.2).astype(np.float32), g)
    _, y, _ = groups.arrays()
    batched = xgb.QuantileDMatrix(GroupBatches(groups, batch_rows=100), max_bin=16)
    assert batched.num_row() == len(y) and batched.num_col() == 4
    np.testing.assert_array_equal(batched.get_label(), y)
    assert len(batched.get_group()) == 40


def test_the_stage_log_reports_time_and_peak_memory_per_stage() -> None:
    stages = StageLog()
    with stages("small"):
        pass
    with stages("holds 200 MB"):
        block = np.ones(200 * 2**20 // 8)
        time.sleep(3 * StageLog.SAMPLE_S)  # held across samples: the peak cannot fall between them
        del block
    assert stages.peak_rss_mb["holds 200 MB"] >= stages.peak_rss_mb["small"] + 150
    text = stages.summary()
    assert "holds 200 MB" in text and "total" in text and text.count("<- slowest") == 1


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_gram_matrix_from_the_ones_of_x_equals_the_dense_one(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "_USER_CHUNK", chunk)
    log = random_log(seed=4, n_users=50, max_per_user=20)
    items = retrieval.ease_items(log, 100, 30)
    x = retrieval.binary_rows(log, items)
    dense = retrieval.binary_matrix(log, items)
    assert x.n_rows == len(dense) and x.mean_diagonal() == pytest.approx(retrieval.mean_diagonal(dense))
    np.testing.assert_array_equal(x.gram(), dense.T.astype(np.float64) @ dense)
    eigen = retrieval.GramEigen.of_rows(x)
    np.testing.assert_allclose(eigen.inverse(5.0), np.linalg.inv(x.gram() + 5.0 * np.eye(len(items))), atol=1e-9)
