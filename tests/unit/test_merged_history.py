"""The merged history of serving: the trained history plus the items a user's online events
named since training (models/core candidates, features, tables.user_profiles)."""

from __future__ import annotations

import numpy as np
import pytest

from models.core.candidates import candidates_by_source, recent_items, user_scores
from models.core.features import build_features, user_profile
from models.core.params import CandidateParams
from models.core.schema import FEATURE_INDEX, ITEM_FEATURES
from models.core.tables import ServingTables, one_user_profile, user_profiles


def _online(tables: ServingTables, user: int | None, n: int) -> np.ndarray:
    """n items the user does not have yet, newest first."""
    seen = set() if user is None else set(tables.history(user).tolist())
    return np.asarray([i for i in tables.pop_order.tolist() if i not in seen][:n], dtype=np.int32)


def test_no_online_items_change_nothing(tables: ServingTables, params: CandidateParams) -> None:
    user = 0
    for online in (None, np.zeros(0, dtype=np.int32)):
        assert np.array_equal(recent_items(tables, user, params, online), recent_items(tables, user, params))
        got = candidates_by_source(tables, user, params, True, online)
        assert np.array_equal(got.items, candidates_by_source(tables, user, params, True).items)


@pytest.mark.parametrize("user", [0, None], ids=["trained user", "new user"])
@pytest.mark.parametrize("n_online", [1, 3])
def test_online_items_come_first_and_are_excluded(
    tables: ServingTables, params: CandidateParams, user: int | None, n_online: int
) -> None:
    online = _online(tables, user, n_online)
    recent = recent_items(tables, user, params, online)
    assert recent[:n_online].tolist() == online.tolist()
    assert len(recent) == len(set(recent.tolist())) <= params.recent_items
    if user is not None:
        trained = [i for i in tables.history(user)[::-1].tolist() if i not in set(online.tolist())]
        assert recent[n_online:].tolist() == list(dict.fromkeys(trained))[: params.recent_items - n_online]
    candidates = candidates_by_source(tables, user, params, True, online)
    assert not set(candidates.items.tolist()) & set(online.tolist())
    # The online items seed the neighbour sources: a new user gets co-occurrence candidates.
    assert len(user_scores(tables, user, params, online).cooc.items) > 0
    assert len(candidates.cooc) > 0


def test_a_repeated_item_counts_once_in_recent(tables: ServingTables, params: CandidateParams) -> None:
    user = 0
    last = int(tables.history(user)[-1])
    recent = recent_items(tables, user, params, np.asarray([last], dtype=np.int32))
    assert recent.tolist().count(last) == 1 and recent[0] == last


@pytest.mark.parametrize("user", range(3))
def test_profile_without_online_items_is_the_trained_row(tables: ServingTables, user: int) -> None:
    feats, genre = user_profile(tables, user)  # type: ignore[misc]
    assert np.array_equal(feats, tables.user_feats[user]) and np.array_equal(genre, tables.user_genre[user])


@pytest.mark.parametrize("user", range(3))
def test_merged_profile_is_computed_as_training_computes_it(tables: ServingTables, user: int) -> None:
    """The merged history's row equals the row user_profiles gives the same interactions,
    and with one trained item moved to 'online' it is the trained row itself."""
    history = tables.history(user)
    feats, genre = user_profile(tables, user, history[-1:])  # type: ignore[misc]
    items = np.concatenate((history, history[-1:]))
    log_pop = tables.item_feats[:, ITEM_FEATURES.index("item_log_pop")]
    year = tables.item_feats[:, ITEM_FEATURES.index("item_year")]
    want_feats, want_genre = user_profiles(np.zeros(len(items), dtype=np.intp), items, 1, log_pop, year,
                                           tables.item_genre)  # fmt: skip
    np.testing.assert_allclose(feats, want_feats[0], rtol=1e-6)
    np.testing.assert_allclose(genre, want_genre[0], rtol=1e-6)
    # One more interaction: the count feature grows, as training would count it.
    assert feats[0] == pytest.approx(np.log1p(len(history) + 1), rel=1e-6)
    assert feats[0] > tables.user_feats[user][0]


def test_new_user_with_online_items_has_user_features(tables: ServingTables, params: CandidateParams) -> None:
    online = _online(tables, None, 3)
    assert user_profile(tables, None) is None
    candidates = candidates_by_source(tables, None, params, True, online)
    features = build_features(tables, None, candidates.items, candidates.scores, online)
    cold = build_features(tables, None, candidates.items, candidates.scores)
    assert np.all(features[:, FEATURE_INDEX["user_log_count"]] == pytest.approx(np.log1p(3)))
    assert np.all(cold[:, FEATURE_INDEX["user_log_count"]] == 0)
    assert np.any(features[:, FEATURE_INDEX["genre_affinity"]] > 0)


@pytest.mark.parametrize("case", ["random", "repeats", "no known year", "one item"])
def test_one_user_profile_is_user_profiles_of_one_user(case: str) -> None:
    """Serving's one-user path computes what training's per-user scatter does."""
    rng = np.random.default_rng(7)
    n_items, n_genres = 50, 6
    log_pop = rng.random(n_items).astype(np.float32) * 5
    year = rng.integers(1950, 2020, n_items).astype(np.float32)
    year[rng.random(n_items) < 0.3] = -1.0  # unknown years are left out of the mean
    genre = (rng.random((n_items, n_genres)) < 0.3).astype(np.float32)
    genre[0] = 0.0  # an item without genres
    items = {"random": rng.integers(0, n_items, 40), "repeats": np.array([3, 3, 3, 7]),
             "no known year": np.flatnonzero(year < 0)[:5], "one item": np.array([0])}[case].astype(np.intp)  # fmt: skip
    feats, profile = one_user_profile(items, log_pop, year, genre)
    want_feats, want_profile = user_profiles(np.zeros(len(items), dtype=np.intp), items, 1, log_pop, year, genre)
    assert feats.dtype == want_feats.dtype and profile.dtype == want_profile.dtype
    np.testing.assert_allclose(feats, want_feats[0], rtol=1e-6)
    np.testing.assert_allclose(profile, want_profile[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("user", [0, None], ids=["trained user", "new user"])
def test_the_recommenders_remembered_profile_is_the_computed_one_for_the_same_online_items(
    tables: ServingTables, params: CandidateParams, user: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.core import recommender as module

    monkeypatch.setattr(module, "PROFILE_CACHE_SIZE", 2)
    rec = module.Recommender(tables, params)
    online = [_online(tables, user, n) for n in (1, 2, 3)]
    for _ in range(2):  # computed, then remembered; 3 keys in a cache of 2: it starts again
        for items in online:
            got, want = rec.merged_profile(user, items), user_profile(tables, user, items)
            assert got is not None and want is not None
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
            assert len(rec._profiles) <= 2
    # Other online items, another profile: the key is the items, not only the user.
    first, second = rec.merged_profile(user, online[0]), rec.merged_profile(user, online[2])
    assert first is not None and second is not None and not np.array_equal(first[1], second[1])
    # The features /recommend builds with it are those built without it.
    prepared = rec.prepare_recommend(user, True, online[1])
    candidates = candidates_by_source(tables, user, params, True, online[1])
    np.testing.assert_array_equal(prepared.features, build_features(tables, user, candidates.items,
                                                                    candidates.scores, online[1]))  # fmt: skip
