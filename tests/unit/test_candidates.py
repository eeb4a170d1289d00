"""Candidate generation, the co-occurrence and EASE indexes and top-k: invariants checked
with hypothesis over users, k and the exclude_seen switch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.core.candidates import (
    COOCCURRENCE,
    EASE,
    POPULARITY,
    candidates_by_source,
    cooc_scores,
    ease_history,
    ease_scores,
    generate_candidates,
    recent_items,
    user_scores,
)
from models.core.features import RANK_NONE, build_features
from models.core.params import CandidateParams
from models.core.ranking import top_k
from models.core.recommender import Recommender
from models.core.schema import FEATURE_INDEX, N_FEATURES
from models.core.tables import ServingTables

FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)


@FIXTURES
@given(user_frac=st.floats(0, 1, exclude_max=True), exclude_seen=st.booleans())
def test_candidates_are_unique_bounded_and_unseen(
    tables: ServingTables, params: CandidateParams, user_frac: float, exclude_seen: bool
) -> None:
    user = int(user_frac * tables.n_users)
    items, _ = generate_candidates(tables, user, params, exclude_seen)
    assert len(np.unique(items)) == len(items)
    assert len(items) <= params.n_cooc + params.n_ease + params.n_pop
    assert ((items >= 0) & (items < tables.n_items)).all()
    if exclude_seen:
        assert not np.isin(items, tables.history(user)).any()


@FIXTURES
@given(
    user_frac=st.floats(0, 1, exclude_max=True),
    k=st.integers(1, 120),
    seed=st.integers(0, 2**31),
)
def test_top_k_of_candidates(
    tables: ServingTables, params: CandidateParams, user_frac: float, k: int, seed: int
) -> None:
    """Results are a subset of the candidates, sorted by score, at most k, no seen items."""
    user = int(user_frac * tables.n_users)
    items, _ = generate_candidates(tables, user, params)
    scores = np.random.default_rng(seed).normal(size=len(items)).astype(np.float32)
    ranked, ranked_scores = top_k(items, scores, k)
    assert len(ranked) == min(k, len(items))
    assert np.isin(ranked, items).all()
    assert (np.diff(ranked_scores) <= 0).all()
    assert not np.isin(ranked, tables.history(user)).any()
    if len(ranked) < len(items):
        rest = scores[~np.isin(items, ranked)]
        assert ranked_scores[-1] >= rest.max()


@FIXTURES
@given(user_frac=st.floats(0, 1, exclude_max=True), k=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_each_recommended_item_names_the_generator_that_proposed_it(
    tables: ServingTables, params: CandidateParams, user_frac: float, k: int, seed: int
) -> None:
    """`source` names the list an item came from: co-occurrence, EASE or popularity (an item
    can be in several tables; the candidate list decides)."""
    user = int(user_frac * tables.n_users)
    candidates = candidates_by_source(tables, user, params)
    rec = Recommender(tables, params)
    prepared = rec.prepare_recommend(user, exclude_seen=True)
    scores = np.random.default_rng(seed).normal(size=len(prepared.items)).astype(np.float32)
    rows = rec.ranked(prepared, scores, k)
    source_of = {
        **{i: POPULARITY for i in tables.item_ids[candidates.pop].tolist()},
        **{i: EASE for i in tables.item_ids[candidates.ease].tolist()},
        **{i: COOCCURRENCE for i in tables.item_ids[candidates.cooc].tolist()},
    }
    assert len(source_of) == len(candidates.items)  # the three lists are disjoint
    for row in rows:
        assert row["source"] == source_of[row["item_id"]]
    assert [r["source"] for r in rec.popular_described(k)] == [POPULARITY] * min(k, tables.n_items)
    ranked = rec.ranked(rec.prepare_rank(user, prepared.items), scores, k)
    assert {r["source"] for r in ranked} == {None}  # /rank: the client chose the items


def test_top_k_keeps_candidate_order_on_ties() -> None:
    items = np.array([7, 3, 5], dtype=np.int32)
    ranked, _ = top_k(items, np.zeros(3, dtype=np.float32), 2)
    assert ranked.tolist() == [7, 3]


def test_each_source_is_ordered_by_its_score(tables: ServingTables, params: CandidateParams) -> None:
    """Co-occurrence candidates first, by co-occurrence score; then EASE's, by EASE score,
    none of them seen or already chosen; then popular items in popularity order."""
    user = int(np.argmax(np.diff(tables.hist_indptr)))  # the most active user
    candidates = candidates_by_source(tables, user, params)
    seen = tables.history(user)
    for part, scores, n in ((candidates.cooc, candidates.scores.cooc, params.n_cooc),
                            (candidates.ease, candidates.scores.ease, params.n_ease)):  # fmt: skip
        assert 0 < len(part) <= n
        pos, found = scores.lookup(part)
        assert found.all() and not np.isin(part, seen).any()
        # Ranked at float32, the precision of the features.
        assert (np.diff(scores.score[pos].astype(np.float32)) <= 0).all()
    assert not np.isin(candidates.ease, candidates.cooc).any()
    # EASE takes its best unseen items that co-occurrence did not take.
    ranked = candidates.scores.ease.ranked_items
    assert candidates.ease.tolist() == ranked[~np.isin(ranked, np.concatenate((seen, candidates.cooc)))][
        : params.n_ease
    ].tolist()
    assert (np.diff(tables.pop_rank[candidates.pop]) > 0).all()
    assert candidates.items.tolist() == [*candidates.cooc, *candidates.ease, *candidates.pop]


@pytest.mark.parametrize("index", ["cooc", "ease"])
def test_neighbour_index_rows_are_sorted_and_positive(tables: ServingTables, params: CandidateParams, index: str) -> None:
    indptr = getattr(tables, f"{index}_indptr")
    items = getattr(tables, f"{index}_items")
    weights = getattr(tables, "cooc_scores" if index == "cooc" else "ease_weights")
    lengths = np.diff(indptr)
    assert len(indptr) == tables.n_items + 1 and indptr[-1] == len(items) == len(weights) > 0
    if index == "cooc":  # EASE keeps k per target item, so a source row can hold more
        assert lengths.max() <= params.cooc_neighbors
    for i in np.flatnonzero(lengths)[:50]:
        row = weights[indptr[i] : indptr[i + 1]]
        neighbours = items[indptr[i] : indptr[i + 1]]
        assert (np.diff(row) <= 0).all() and (row > 0).all()
        assert i not in neighbours


@pytest.mark.parametrize(("n_recent", "n_ease"), [(3, 3), (2, 7), (7, 2)])
def test_each_source_sums_over_its_own_window_latest_first(tables: ServingTables, n_recent: int, n_ease: int) -> None:
    """Co-occurrence is seeded by the last recent_items items, EASE sums over the last
    ease_history items: two windows of one history, chosen apart in training."""
    params = CandidateParams(recent_items=n_recent, ease_history=n_ease)
    user = int(np.argmax(np.diff(tables.hist_indptr)))  # the longest history
    newest_first = tables.history(user)[::-1]
    assert len(newest_first) > max(n_recent, n_ease)
    assert recent_items(tables, user, params).tolist() == newest_first[:n_recent].tolist()
    assert ease_history(tables, user, params).tolist() == newest_first[:n_ease].tolist()
    scores = user_scores(tables, user, params)
    assert np.array_equal(scores.cooc.score, cooc_scores(tables, newest_first[:n_recent], params).score)
    assert np.array_equal(scores.ease.score, ease_scores(tables, newest_first[:n_ease]).score)
    assert len(recent_items(tables, None, params)) == len(ease_history(tables, None, params)) == 0


def test_versions_from_before_ease_history_sum_ease_over_the_recent_items() -> None:
    saved = {k: v for k, v in CandidateParams(recent_items=50).to_dict().items() if k != "ease_history"}
    assert CandidateParams.from_dict(saved).ease_history == 50
    assert CandidateParams.from_dict({**saved, "ease_history": 500}).ease_history == 500


def test_unknown_user_gets_popular_candidates(tables: ServingTables, params: CandidateParams) -> None:
    items, scores = generate_candidates(tables, None, params)
    assert len(scores.cooc.items) == len(scores.ease.items) == 0
    assert items.tolist() == tables.pop_order[: params.n_pop].tolist()


def test_features_of_candidates(tables: ServingTables, params: CandidateParams) -> None:
    user = 1
    recent = recent_items(tables, user, params)
    scores = user_scores(tables, user, params)
    cooc = scores.cooc
    assert cooc.items.tolist() == cooc_scores(tables, recent, params).items.tolist()
    items, _ = generate_candidates(tables, user, params)
    x = build_features(tables, user, items, scores)
    assert x.shape == (len(items), N_FEATURES) and x.dtype == np.float32
    assert np.isfinite(x).all()
    _, found = cooc.lookup(items)
    score, best = x[:, FEATURE_INDEX["cooc_score"]], x[:, FEATURE_INDEX["cooc_max"]]
    assert (score[found] > 0).all() and (score[~found] == 0).all()
    # score is a weighted sum over the recent items, so it bounds the best single score.
    min_weight = params.recency_decay ** (len(recent) - 1)
    assert (best * min_weight <= score + 1e-6).all()
    assert (x[~found, FEATURE_INDEX["cooc_rank"]] == RANK_NONE).all()
    pos, found = scores.ease.lookup(items)
    assert found.any() and np.allclose(x[found, FEATURE_INDEX["ease_score"]], scores.ease.score[pos[found]])
    assert (x[~found, FEATURE_INDEX["ease_score"]] == 0).all()
    assert (x[~found, FEATURE_INDEX["ease_rank"]] == RANK_NONE).all()
    ranks = x[found, FEATURE_INDEX["ease_rank"]]
    assert (ranks == np.minimum(scores.ease.rank[pos[found]], RANK_NONE)).all()
