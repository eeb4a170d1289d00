"""Candidate generation, the co-occurrence index and top-k: invariants checked with
hypothesis over users, k and the exclude_seen switch."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.core.candidates import (
    COOCCURRENCE,
    POPULARITY,
    candidates_by_source,
    cooc_scores,
    generate_candidates,
    recent_items,
)
from models.core.features import COOC_RANK_NONE, build_features
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
    assert len(items) <= params.n_cooc + params.n_pop
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
    """`source` is cooccurrence exactly for the items of the co-occurrence list, popularity
    for the others (an item can be in both tables; the candidate list decides)."""
    user = int(user_frac * tables.n_users)
    from_cooc, from_pop, _ = candidates_by_source(tables, user, params)
    rec = Recommender(tables, params)
    prepared = rec.prepare_recommend(user, exclude_seen=True)
    scores = np.random.default_rng(seed).normal(size=len(prepared.items)).astype(np.float32)
    rows = rec.ranked(prepared, scores, k)
    cooc_ids, pop_ids = set(tables.item_ids[from_cooc].tolist()), set(tables.item_ids[from_pop].tolist())
    for row in rows:
        assert row["source"] == (COOCCURRENCE if row["item_id"] in cooc_ids else POPULARITY)
        assert row["item_id"] in cooc_ids | pop_ids
    assert [r["source"] for r in rec.popular_described(k)] == [POPULARITY] * min(k, tables.n_items)
    ranked = rec.ranked(rec.prepare_rank(user, prepared.items), scores, k)
    assert {r["source"] for r in ranked} == {None}  # /rank: the client chose the items


def test_top_k_keeps_candidate_order_on_ties() -> None:
    items = np.array([7, 3, 5], dtype=np.int32)
    ranked, _ = top_k(items, np.zeros(3, dtype=np.float32), 2)
    assert ranked.tolist() == [7, 3]


def test_cooc_candidates_come_first_ordered_by_score(tables: ServingTables, params: CandidateParams) -> None:
    user = int(np.argmax(np.diff(tables.hist_indptr)))  # the most active user
    items, cooc = generate_candidates(tables, user, params)
    unseen_cooc = cooc.items[~np.isin(cooc.items, tables.history(user))]
    n_cooc = min(params.n_cooc, len(unseen_cooc))
    assert n_cooc > 0
    pos, found = cooc.lookup(items[:n_cooc])
    assert found.all()
    assert (np.diff(cooc.score[pos]) <= 1e-12).all()
    # The popularity part follows popularity order.
    assert (np.diff(tables.pop_rank[items[n_cooc:]]) > 0).all()


def test_cooc_index_rows_are_sorted_and_bounded(tables: ServingTables, params: CandidateParams) -> None:
    lengths = np.diff(tables.cooc_indptr)
    assert lengths.max() <= params.cooc_neighbors
    for i in np.flatnonzero(lengths)[:50]:
        row = tables.cooc_scores[tables.cooc_indptr[i] : tables.cooc_indptr[i + 1]]
        neighbours = tables.cooc_items[tables.cooc_indptr[i] : tables.cooc_indptr[i + 1]]
        assert (np.diff(row) <= 0).all() and (row > 0).all()
        assert i not in neighbours


def test_recent_items_are_latest_first(tables: ServingTables, params: CandidateParams) -> None:
    user = 0
    recent = recent_items(tables, user, params)
    history = tables.history(user)
    assert recent.tolist() == history[::-1][: params.recent_items].tolist()
    assert len(recent_items(tables, None, params)) == 0


def test_unknown_user_gets_popular_candidates(tables: ServingTables, params: CandidateParams) -> None:
    items, cooc = generate_candidates(tables, None, params)
    assert len(cooc.items) == 0
    assert items.tolist() == tables.pop_order[: params.n_pop].tolist()


def test_features_of_candidates(tables: ServingTables, params: CandidateParams) -> None:
    user = 1
    recent = recent_items(tables, user, params)
    cooc = cooc_scores(tables, recent, params)
    items, _ = generate_candidates(tables, user, params)
    x = build_features(tables, user, items, cooc)
    assert x.shape == (len(items), N_FEATURES) and x.dtype == np.float32
    assert np.isfinite(x).all()
    _, found = cooc.lookup(items)
    score, best = x[:, FEATURE_INDEX["cooc_score"]], x[:, FEATURE_INDEX["cooc_max"]]
    assert (score[found] > 0).all() and (score[~found] == 0).all()
    # score is a weighted sum over the recent items, so it bounds the best single score.
    min_weight = params.recency_decay ** (len(recent) - 1)
    assert (best * min_weight <= score + 1e-6).all()
    assert (x[~found, FEATURE_INDEX["cooc_rank"]] == COOC_RANK_NONE).all()
