"""The baselines of bench/quality.py against closed forms and hand computations, and the
statistics it reports (NDCG@k curve, paired bootstrap) against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from bench.baselines import (
    ease_scores,
    fit_ease,
    judge,
    knn_scores,
    ndcg_curve,
    oracle_scores,
    paired_bootstrap,
    rank_rows,
)
from models.core.metrics import ranking_metrics
from training.datasets import STAY, SyntheticTaste, SyntheticWorld, synthetic, synthetic_world

# 7 users × 6 items, made by hand so that items differ in popularity and overlap.
X = sp.csr_matrix(np.array([
    [1, 1, 0, 0, 1, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 1, 0, 0, 1],
    [0, 0, 1, 1, 0, 0],
    [1, 0, 0, 1, 1, 0],
    [1, 1, 0, 0, 0, 1],
    [0, 1, 1, 1, 0, 0],
], dtype=np.float64))  # fmt: skip


def ease_by_ridge(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE another way: column j of B is the ridge regression of item j on the other items
    (the constraint diag(B) = 0 makes the columns independent problems)."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        a = x[:, others]
        b[others, j] = np.linalg.solve(a.T @ a + lam * np.eye(n - 1), a.T @ x[:, j])
    return b


@pytest.mark.parametrize("lam", [0.3, 2.0, 25.0])
def test_ease_scores_and_top_n_equal_the_closed_form_computed_by_ridge_regression(lam: float) -> None:
    seen = X[[0, 3, 6]]
    _, scores = next(ease_scores(fit_ease(X, max_items=6), seen, [lam]))
    expected = seen.toarray() @ ease_by_ridge(X.toarray(), lam)
    np.testing.assert_allclose(scores, expected, atol=1e-9)
    tie = np.arange(6)
    ranked = rank_rows(scores, seen, tie, 3)
    for row, want, got in zip(seen.toarray(), expected, ranked, strict=True):
        unseen = np.flatnonzero(row == 0)
        # Ties (none expected here) would go to the lower index, as with tie = arange.
        assert got.tolist() == unseen[np.lexsort((unseen, -want[unseen]))][:3].tolist()


def test_ease_on_a_universe_of_popular_items_never_lists_the_others() -> None:
    fit = fit_ease(X, max_items=3)
    counts = np.asarray(X.sum(axis=0)).ravel()
    assert set(fit.universe) == set(np.argsort(-counts, kind="stable")[:3])
    _, scores = next(ease_scores(fit, X, [1.0]))
    outside = np.setdiff1d(np.arange(6), fit.universe)
    assert np.isneginf(scores[:, outside]).all()
    assert all(not set(r) & set(outside) for r in rank_rows(scores, X, np.arange(6), 6))
    assert fit.mean_diag == pytest.approx(counts[fit.universe].mean())


def test_ease_refuses_a_lambda_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="lambda must be > 0, got 0"):
        next(ease_scores(fit_ease(X, 6), X, [0.0]))


# Users × items for ItemKNN: counts n = (2, 3, 3, 1); co-counts c01 = 2, c02 = 1, c12 = 2, c23 = 1.
KNN_X = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float64))
S01, S02, S12, S23 = 2 / math.sqrt(6), 1 / math.sqrt(6), 2 / 3, 1 / math.sqrt(3)  # cosine, shrink 0
T01, T02, T12, T23 = 2 / (math.sqrt(6) + 1), 1 / (math.sqrt(6) + 1), 2 / 4, 1 / (math.sqrt(3) + 1)  # shrink 1


@pytest.mark.parametrize(
    ("seen", "k", "shrink", "expected"),
    [
        # k = 3 keeps every neighbour: plain item-based cosine.
        ([0], 3, 0.0, [0, S01, S02, 0]),
        ([1, 3], 3, 0.0, [S01, 0, S12 + S23, 0]),
        # k = 1: the only neighbour of 0 is 1, of 1 is 0, of 2 is 1, of 3 is 2.
        ([0], 1, 0.0, [0, S01, 0, 0]),
        ([1, 3], 1, 0.0, [S01, 0, S12, 0]),
        # k = 2: 2's neighbours are 1 and 3 (S02 < S23), 3's only real one is 2.
        ([1, 3], 2, 0.0, [S01, 0, S12 + S23, 0]),
        # 0's neighbours are 1 and 2, so seen 2 scores it; 2's are 1 and 3, not 0.
        ([0, 2], 2, 0.0, [S02, S01 + S12, 0, S23]),
        ([1, 3], 3, 1.0, [T01, 0, T12 + T23, 0]),
    ],
)
def test_itemknn_cosine_scores_equal_a_hand_computation(
    seen: list[int], k: int, shrink: float, expected: list[float]
) -> None:
    row = sp.csr_matrix((np.ones(len(seen)), (np.zeros(len(seen), dtype=int), seen)), shape=(1, 4))
    # Block 3 of 4 items: the seam between two blocks of columns is crossed.
    scores = knn_scores(KNN_X, row, [1, 2, k, 10], shrink, block=3)
    assert sorted(scores) == sorted({1, 2, k, 3})  # 10 is capped at n_items - 1 = 3, "every item"
    np.testing.assert_allclose(scores[k][0], expected, rtol=1e-6)


@pytest.mark.parametrize(("ks", "shrink", "match"), [([0], 0.0, "k >= 1"), ([5], -1.0, "shrink must be >= 0")])
def test_itemknn_refuses_a_bad_k_or_shrink(ks: list[int], shrink: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        knn_scores(KNN_X, KNN_X, ks, shrink)


def test_rank_rows_leaves_out_seen_and_minus_infinity_and_breaks_ties_by_the_tie_key() -> None:
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.5, 0.1]])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0]]))
    tie = np.array([5, 0, 4, 1, 3, 2])  # among equal scores, lower tie first: 4, then 2, then 0
    assert rank_rows(scores, seen, tie, 6)[0].tolist() == [4, 2, 0, 5]
    assert rank_rows(scores, seen, tie, 2)[0].tolist() == [4, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_curve_and_judge_equal_ranking_metrics_at_every_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranked = [rng.permutation(60)[: rng.integers(0, 30)] for _ in range(40)]
    relevant = [rng.choice(60, size=rng.integers(0, 12), replace=False) for _ in range(40)]
    curve = ndcg_curve(ranked, relevant, 25)
    for k in (1, 5, 10, 25):
        assert curve[k - 1] == pytest.approx(np.mean([ranking_metrics(r, rel, k)["ndcg"] for r, rel in
                                                      zip(ranked, relevant, strict=True)]))  # fmt: skip
    judged = judge(ranked, relevant, 10, 20)
    assert judged["map"].mean() == pytest.approx(np.mean([ranking_metrics(r, rel, 10)["map"] for r, rel in
                                                          zip(ranked, relevant, strict=True)]))  # fmt: skip
    assert judged["recall@20"][0] == pytest.approx(np.isin(relevant[0], ranked[0][:20]).mean() if len(relevant[0]) else 0)


def test_the_paired_bootstrap_covers_the_true_gain_about_as_often_as_its_level() -> None:
    """Fresh paired data per trial: a = b + 0.05 + noise, so the true mean difference is 0.05
    and the true ratio (0.5 + 0.05) / 0.5 = 1.1. A 95% interval should cover both in about
    95% of the trials (the binomial spread of 200 trials is ±3 points)."""
    rng = np.random.default_rng(7)
    cover_diff = cover_ratio = 0
    trials = 200
    for t in range(trials):
        b = rng.random(300)
        a = b + 0.05 + rng.normal(0, 0.2, 300)
        i = paired_bootstrap(a, b, n_resamples=500, seed=t)
        assert i.diff_lo <= i.diff <= i.diff_hi and i.ratio_lo <= i.ratio <= i.ratio_hi
        cover_diff += i.diff_lo <= 0.05 <= i.diff_hi
        cover_ratio += i.ratio_lo <= 1.1 <= i.ratio_hi
    assert 0.89 <= cover_diff / trials <= 0.99
    assert 0.89 <= cover_ratio / trials <= 0.99


def test_the_paired_bootstrap_is_seeded_and_pairs_users() -> None:
    rng = np.random.default_rng(3)
    b = rng.random(200)
    a = b + 0.01  # the same gain for every user: a paired interval has no width to speak of
    i = paired_bootstrap(a, b, 1000, seed=1)
    assert i == paired_bootstrap(a, b, 1000, seed=1)
    assert i.diff_hi - i.diff_lo < 1e-9 and i.diff == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"two 1-d arrays of one non-zero length, got \(200,\) and \(3,\)"):
        paired_bootstrap(a, b[:3], 10, seed=0)


# Two topics: items 0 and 1 in topic 0 (weights 3 and 1), 2 and 3 in topic 1. One user whose
# favourites are half topic 0, half topic 1, so the long-run mixture is (0.5, 0.5).
WORLD = SyntheticWorld(
    item_topic=np.array([0, 0, 1, 1]), item_weight=np.array([3.0, 1.0, 1.0, 1.0]),
    taste=SyntheticTaste(topic_pop=np.array([0.5, 0.5]), favourites=np.array([[0, 0, 1]]),
                         fav_weights=np.array([[0.25, 0.25, 0.5]])),
)  # fmt: skip


@pytest.mark.parametrize("horizon", [1, 2, 7])
def test_the_oracle_is_the_chance_of_each_item_over_the_horizons_draws(horizon: int) -> None:
    # The last item (1) is in topic 0: s draws ahead, topic 0 has STAY**s + (1 - STAY**s)/2.
    got = oracle_scores(WORLD, np.arange(4), np.array([0]), np.array([1]), np.array([horizon]))[0]
    topic0 = sum(STAY**s + (1 - STAY**s) * 0.5 for s in range(1, horizon + 1))
    want = np.array([0.75 * topic0, 0.25 * topic0, 0.5 * (horizon - topic0), 0.5 * (horizon - topic0)])
    np.testing.assert_allclose(got, want)
    assert got.sum() == pytest.approx(horizon)  # one item per draw


def test_synthetic_world_is_synthetics_data_with_the_truth_behind_it() -> None:
    dataset, world = synthetic_world(300, 100, 6000, n_topics=8, seed=2)
    assert dataset.content_hash == synthetic(300, 100, 6000, n_topics=8, seed=2).content_hash
    # One topic and weight per item, three favourite topics per user with weights summing to 1.
    assert world.item_topic.shape == world.item_weight.shape == (100,)
    assert world.taste.favourites.shape == world.taste.fav_weights.shape == (300, 3)
    np.testing.assert_allclose(world.taste.fav_weights.sum(axis=1), 1.0)
