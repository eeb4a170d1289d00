"""EASE retrieval: the closed form against the constrained least-squares problem solved
another way, the eigendecomposition path against the direct inverse, the sparse serving
index, the tables' round trip, the "ease" candidate source, and the choice on validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.core.candidates import EASE, candidates_by_source, ease_history, ease_scores
from models.core.interactions import InteractionLog, ItemCatalog, build_log
from models.core.params import CandidateParams
from models.core.recommender import Recommender
from models.core.retrieval import (
    GramEigen,
    binary_matrix,
    build_ease_index,
    ease_items,
    ease_weights,
    ease_weights_path,
    gram,
    mean_diagonal,
    top_neighbours,
)
from models.core.tables import ServingTables, build_tables, popularity
from training.datasets import Dataset
from training.retrieval import RetrievalSearch, choose_retrieval, mix_grid
from training.split import SplitConfig, window

# Hand-made binary user × item matrices: more users than items (EASE's direct inverse) and
# fewer (its user-side eigendecomposition).
TALL = np.array(
    [
        [1, 1, 0, 0, 1],
        [1, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [1, 0, 0, 1, 1],
        [0, 1, 0, 1, 0],
    ],
    dtype=np.float32,
)
WIDE = np.array(
    [
        [1, 1, 0, 0, 1, 0, 1],
        [0, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0, 1, 1],
    ],
    dtype=np.float32,
)
MATRICES = pytest.mark.parametrize("x", [TALL, WIDE], ids=["more_users", "more_items"])
LAMBDAS = (0.3, 2.0, 25.0)


def lagrange_weights(x: np.ndarray, lam: float) -> np.ndarray:
    """min ||X - XB||² + λ||B||² s.t. diag(B) = 0, one column at a time: column j solves
    the KKT system [[G + λI, e_j], [e_jᵀ, 0]] [b; μ] = [G e_j; 0] (μ: the multiplier of b_j = 0)."""
    x = x.astype(np.float64)
    g, n = x.T @ x, x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = g + lam * np.eye(n)
        kkt[:n, n] = kkt[n, :n] = np.eye(n)[j]
        b[:, j] = np.linalg.solve(kkt, np.concatenate((g[:, j], [0.0])))[:n]
    return b


def log_of(x: np.ndarray) -> InteractionLog:
    """The interactions of a binary matrix, one per 1, in column order per user."""
    user, item = np.nonzero(x)
    return InteractionLog(
        user=user.astype(np.int32), item=item.astype(np.int32), ts=np.arange(len(user), dtype=np.int64),
        rating=np.full(len(user), np.nan, dtype=np.float32), user_ids=np.array([f"u{u}" for u in range(len(x))]),
    )  # fmt: skip


def catalog_of(n_items: int) -> ItemCatalog:
    return ItemCatalog(
        item_ids=np.array([f"i{i}" for i in range(n_items)]), titles=np.array([f"t{i}" for i in range(n_items)]),
        genres=np.array(["a|b" if i % 2 else "b" for i in range(n_items)]), years=np.full(n_items, 2000, np.float32),
    )  # fmt: skip


@MATRICES
@pytest.mark.parametrize("lam", LAMBDAS)
def test_closed_form_equals_the_constrained_least_squares_solution(x: np.ndarray, lam: float) -> None:
    expected = lagrange_weights(x, lam)
    assert np.allclose(np.diag(expected), 0.0, atol=1e-12)
    assert np.allclose(ease_weights(gram(x), lam), expected, atol=1e-9)
    # The eigendecomposition route (the user side for the wide matrix) gives the same B.
    assert np.allclose(next(ease_weights_path(GramEigen.of(x), [lam])), expected, atol=1e-9)


@MATRICES
def test_one_eigendecomposition_gives_every_lambda(x: np.ndarray) -> None:
    eigen = GramEigen.of(x)
    assert eigen.vectors.shape[1] == np.linalg.matrix_rank(x)
    g = gram(x)
    for lam, b in zip(LAMBDAS, ease_weights_path(eigen, LAMBDAS)):
        assert np.allclose(eigen.inverse(lam), np.linalg.inv(g + lam * np.eye(len(g))), atol=1e-12)
        assert np.allclose(b, ease_weights(g, lam), atol=1e-9)


@MATRICES
@pytest.mark.parametrize("lam", LAMBDAS)
def test_served_top_n_equals_the_closed_form(x: np.ndarray, lam: float) -> None:
    """With every weight kept (k ≥ n) and every history item recent, the served EASE score
    of an unseen item is Σ_{i seen} max(B_ij, 0) (serving keeps positive weights only), and
    the EASE candidates are the top-N of those scores."""
    n_users, n_items = x.shape
    expected_b = np.maximum(lagrange_weights(x, lam), 0.0)
    params = CandidateParams(
        n_cooc=1, n_ease=3, n_pop=1, ease_l2=lam / mean_diagonal(x), ease_neighbors=n_items,
        ease_max_items=n_items, recent_items=n_items, ease_history=n_items,
    )  # fmt: skip
    log = log_of(x)
    tables = build_tables(log, catalog_of(n_items), ["a", "b"], params)
    for user in range(n_users):
        seen = x[user] > 0
        scores = ease_scores(tables, ease_history(tables, user, params))
        expected = x[user].astype(np.float64) @ expected_b
        assert np.allclose(scores.score, expected[scores.items], atol=1e-6)
        assert set(scores.items.tolist()) == set(np.flatnonzero(expected > 0).tolist())
        unseen = np.flatnonzero(~seen & (expected > 0))
        ranked = scores.ranked_items
        served_top = ranked[~np.isin(ranked, np.flatnonzero(seen))][: params.n_ease]
        # The top-N by value (items of equal score may come in either order).
        assert np.allclose(expected[served_top], np.sort(expected[unseen])[::-1][: params.n_ease], atol=1e-6)
        candidates = candidates_by_source(tables, user, params)
        taken = np.concatenate((np.flatnonzero(seen), candidates.cooc))
        assert candidates.ease.tolist() == ranked[~np.isin(ranked, taken)][: params.n_ease].tolist()


def test_the_index_keeps_exactly_the_top_k_positive_weights_per_target_item() -> None:
    rng = np.random.default_rng(0)
    n, n_items, k = 30, 40, 6
    b = rng.normal(size=(n, n))
    b[:, 3] = -1.0  # an item nothing is positive evidence for
    b[:, 5] = np.where(np.arange(n) < 2, 1.0, -1.0)  # only two positive sources
    np.fill_diagonal(b, 0.0)
    items = np.sort(rng.choice(n_items, n, replace=False)).astype(np.int32)
    indptr, targets, weights = top_neighbours(b, items, n_items, k)
    assert indptr.dtype == np.int64 and targets.dtype == np.int32 and weights.dtype == np.float32
    assert len(indptr) == n_items + 1 and indptr[-1] == len(targets) == len(weights)
    kept = np.zeros((n, n))
    position = {int(i): a for a, i in enumerate(items)}
    for i in range(n_items):
        row_t, row_w = targets[indptr[i] : indptr[i + 1]], weights[indptr[i] : indptr[i + 1]]
        if i not in position:
            assert len(row_t) == 0
            continue
        assert (np.diff(row_w) <= 0).all() and (row_w > 0).all()
        kept[position[i], [position[int(t)] for t in row_t]] = row_w
    for c in range(n):
        positive = np.flatnonzero(b[:, c] > 0)
        top = positive[np.argsort(-b[positive, c])][:k]
        assert set(np.flatnonzero(kept[:, c]).tolist()) == set(top.tolist())
        assert np.allclose(kept[top, c], b[top, c], atol=1e-6)


def test_ease_models_the_most_popular_items_only() -> None:
    x = TALL.copy()
    log = log_of(x)
    users_per_item = x.sum(axis=0)
    top = ease_items(log, x.shape[1], 3)
    assert len(top) == 3 and (np.diff(top) > 0).all()
    assert users_per_item[top].min() >= np.delete(users_per_item, top).max()
    assert np.array_equal(binary_matrix(log, top), x[:, top][x[:, top].any(axis=1)])
    indptr, targets, _ = build_ease_index(log, x.shape[1], CandidateParams(ease_max_items=3))
    assert set(np.repeat(np.arange(x.shape[1]), np.diff(indptr)).tolist()) <= set(top.tolist())
    assert set(targets.tolist()) <= set(top.tolist())


def test_tables_round_trip_with_the_ease_index(tmp_path: Path, tables: ServingTables) -> None:
    assert len(tables.ease_items) > 0
    written = tables.save(tmp_path)
    loaded = ServingTables.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
    for name, value in vars(tables).items():
        assert np.array_equal(getattr(loaded, name), value), name
        assert getattr(loaded, name).dtype == value.dtype or value.dtype.kind in "OU", name
    assert loaded.ease_indptr.dtype == np.int64 and loaded.ease_weights.dtype == np.float32


def test_recommendations_name_the_ease_source_and_exclude_seen_items(
    tables: ServingTables, params: CandidateParams
) -> None:
    rec = Recommender(tables, params)
    users = range(0, tables.n_users, max(1, tables.n_users // 40))
    sources = set()
    for user in users:
        candidates = candidates_by_source(tables, user, params)
        assert not np.isin(candidates.ease, tables.history(user)).any()
        prepared = rec.prepare_recommend(user, exclude_seen=True)
        # Rank EASE's candidates first, so they are what is recommended.
        scores = np.isin(prepared.items, candidates.ease).astype(np.float32)
        rows = rec.ranked(prepared, scores, 10)
        sources |= {r["source"] for r in rows}
        shown = {r["item_id"] for r in rows if r["source"] == EASE}
        assert shown <= set(tables.item_ids[candidates.ease].tolist())
        assert not shown & set(tables.item_ids[tables.history(user)].tolist())
    assert EASE in sources


def test_mix_grid_shares_the_whole_budget_with_every_source() -> None:
    grid = mix_grid(200, 8)
    assert len(grid) == 21 and len(set(grid)) == 21
    assert all(sum(m) == 200 and min(m) >= 25 for m in grid)
    assert all(sum(m) == 30 and min(m) >= 3 for m in mix_grid(30, 8))  # 3 per step, rest to pop
    with pytest.raises(ValueError, match="budget_steps"):
        mix_grid(5, 8)


def test_choice_on_validation_is_the_best_measured(synthetic_dataset: Dataset) -> None:
    cat = synthetic_dataset.catalog
    win = window(synthetic_dataset.log, 1, SplitConfig())
    params = CandidateParams()
    search = RetrievalSearch(l2_grid=(4.0, 8.0, 16.0), max_users=150)
    chosen = choose_retrieval(win, cat, cat.genre_names(), params, seed=1, search=search)
    curve = chosen.curve
    best_lambda = max(curve["lambda"], key=lambda r: r["ease_recall"])
    assert chosen.params.ease_l2 == best_lambda["ease_l2"]
    best_mix = max(curve["mix"], key=lambda r: r["recall"])
    assert (chosen.params.n_cooc, chosen.params.n_ease, chosen.params.n_pop) == (
        best_mix["n_cooc"], best_mix["n_ease"], best_mix["n_pop"],
    )  # fmt: skip
    assert chosen.params.n_cooc + chosen.params.n_ease + chosen.params.n_pop == 200
    assert curve["users"] == 150 and curve["chosen"]["recall"] == best_mix["recall"]
    # The grid is extended past an end only while that end is the best so far.
    rows = curve["lambda"]
    l2s = [r["ease_l2"] for r in rows]
    assert set(search.l2_grid) <= set(l2s) and l2s == sorted(l2s)
    lo, hi = min(search.l2_grid), max(search.l2_grid)
    for i, r in enumerate(rows):
        if r["ease_l2"] > hi:  # it extended the upper end: the one before beat all below it
            assert rows[i - 1]["ease_recall"] > max([x["ease_recall"] for x in rows[: i - 1]], default=-1)
        if r["ease_l2"] < lo:
            assert rows[i + 1]["ease_recall"] > max([x["ease_recall"] for x in rows[i + 2 :]], default=-1)
    best_recency = max(curve["recency"], key=lambda r: r["recall"])
    assert (chosen.params.recent_items, chosen.params.recency_decay, chosen.params.ease_history) == (
        best_recency["recent_items"], best_recency["recency_decay"], best_recency["ease_history"])  # fmt: skip
    # Every combination of the windows of the two sources, each once.
    combos = {(r["recent_items"], r["recency_decay"], r["ease_history"]) for r in curve["recency"]}
    assert len(combos) == len(curve["recency"]) == (
        len(search.recent_items) * len(search.recency_decays) * len(search.ease_histories))  # fmt: skip
    # Everything else is kept, so the window's tables may take the co-occurrence index measured on.
    assert chosen.params.cooc_neighbors == params.cooc_neighbors and chosen.params.cooc_window == params.cooc_window
    assert chosen.tables is not None
    fresh = build_tables(win.history, cat, cat.genre_names(), chosen.params, user_history=win.user_history)
    reused = build_tables(win.history, cat, cat.genre_names(), chosen.params, user_history=win.user_history,
                          cooc_from=chosen.tables)  # fmt: skip
    for name in ("cooc_indptr", "cooc_items", "cooc_scores", "ease_items", "pop_order", "item_feats"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(fresh, name), err_msg=name)


@pytest.mark.parametrize(("trend", "expected_first"), [(0.0, 0), (1.0, 1)])
def test_popularity_order_follows_pop_trend(trend: float, expected_first: int) -> None:
    """Item 0 is the most popular of all time, item 1 the most popular lately."""
    frame = pd.DataFrame(
        {"user_id": [f"u{u}" for u in range(12)], "item_id": ["0"] * 8 + ["1"] * 4,
         "ts": [0, 1, 2, 3, 4, 5, 6, 7, 97, 98, 99, 100], "rating": np.nan}
    )  # fmt: skip
    log = build_log(frame, np.array(["0", "1", "2"]))
    count, recent, order, rank = popularity(log, 3, CandidateParams(pop_trend=trend, recent_quantile=0.6))
    assert count.tolist() == [8, 4, 0] and recent[1] == 4 and recent[0] < 4
    assert order[0] == expected_first and rank[order].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="pop_trend must be in"):
        CandidateParams(pop_trend=1.5)
