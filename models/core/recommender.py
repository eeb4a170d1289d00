"""The serving-side recommender, without BentoML: resolve ids, generate candidates, build
features, and turn scores into ranked items. The API service calls it around the ranking
service, which only scores feature matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.core.candidates import (
    COOCCURRENCE,
    EASE,
    POPULARITY,
    CandidateSource,
    candidates_by_source,
    user_scores,
)
from models.core.features import Profile, build_features, user_profile
from models.core.params import CandidateParams
from models.core.ranking import predict_scores, top_k
from models.core.tables import ServingTables


# Merged profiles one Recommender remembers (each ~0.3 KB): beyond, it starts again.
PROFILE_CACHE_SIZE = 20_000


class UnknownItemsError(ValueError):
    """Item ids that are not in the model's catalog."""

    def __init__(self, unknown: list[str]) -> None:
        self.unknown = unknown
        shown = unknown[:20]
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        super().__init__(
            f"item_ids: unknown item ids {shown}{more} (rule: every id must be in the model's catalog)"
        )


@dataclass(frozen=True)
class Prepared:
    """What the ranking service must score for one request."""

    user: int | None  # None: unknown user (cold start)
    items: np.ndarray  # int32 item indices
    features: np.ndarray  # float32 (len(items), N_FEATURES)
    # The first n_cooc items came from co-occurrence, the next n_ease from EASE, the others
    # from popularity; n_cooc is None when the client gave the items (/rank).
    n_cooc: int | None = None
    n_ease: int = 0


class Recommender:
    """Serving tables plus their indexes. Stateless per request and safe to share."""

    def __init__(self, tables: ServingTables, params: CandidateParams) -> None:
        self.tables = tables
        self.params = params
        self._user_index = {uid: i for i, uid in enumerate(tables.user_ids.tolist())}
        self._item_index = {iid: i for i, iid in enumerate(tables.item_ids.tolist())}
        self._genres = [g.split("|") if g else [] for g in tables.genres.tolist()]
        self._titles = tables.titles.tolist()
        self._item_ids = tables.item_ids.tolist()
        # Merged profiles (trained history + online items) by (user, online items): a user
        # asks again far more often than they act, and computing one was ~3% of an API
        # worker's CPU at 64 clients. Emptied when full: plain dict operations are atomic,
        # so requests offloaded to threads may share it.
        self._profiles: dict[tuple[int | None, bytes], Profile | None] = {}

    def merged_profile(self, user: int | None, online: np.ndarray | None) -> Profile | None:
        """`user_profile(tables, user, online)`, remembered while `online` is unchanged."""
        if online is None or len(online) == 0:
            return user_profile(self.tables, user, online)  # the trained row: nothing to compute
        key = (user, np.ascontiguousarray(online, dtype=np.int32).tobytes())
        try:
            return self._profiles[key]
        except KeyError:
            pass
        profile = user_profile(self.tables, user, online)
        if len(self._profiles) >= PROFILE_CACHE_SIZE:
            self._profiles.clear()
        self._profiles[key] = profile
        return profile

    def user_index(self, user_id: str) -> int | None:
        return self._user_index.get(user_id)

    def item_indices(self, item_ids: list[str]) -> np.ndarray:
        idx = [self._item_index.get(i, -1) for i in item_ids]
        unknown = [i for i, j in zip(item_ids, idx) if j < 0]
        if unknown:
            raise UnknownItemsError(list(dict.fromkeys(unknown)))
        return np.asarray(idx, dtype=np.int32)

    def knows(self, item_id: str) -> bool:
        return item_id in self._item_index

    def known_items(self, item_ids: list[str]) -> np.ndarray:
        """The catalog indices of the ids the model knows, in order, each once (int32):
        online items the model was not trained on are stored, not used."""
        idx = [self._item_index.get(i, -1) for i in dict.fromkeys(item_ids)]
        return np.asarray([i for i in idx if i >= 0], dtype=np.int32)

    def trained_count(self, user: int | None) -> int:
        return 0 if user is None else len(self.tables.history(user))

    def prepare_recommend(self, user: int | None, exclude_seen: bool, online: np.ndarray | None = None) -> Prepared:
        """`online`: the user's items since training (known_items, newest first)."""
        candidates = candidates_by_source(self.tables, user, self.params, exclude_seen, online)
        items = candidates.items
        features = build_features(self.tables, user, items, candidates.scores, online,
                                  self.merged_profile(user, online))  # fmt: skip
        return Prepared(user, items, features, len(candidates.cooc), len(candidates.ease))

    def prepare_rank(self, user: int | None, items: np.ndarray, online: np.ndarray | None = None) -> Prepared:
        scores = user_scores(self.tables, user, self.params, online)
        profile = self.merged_profile(user, online)
        return Prepared(user, items, build_features(self.tables, user, items, scores, online, profile))

    def popular(self, k: int) -> np.ndarray:
        return self.tables.pop_order[:k]

    def describe(
        self, items: np.ndarray, scores: np.ndarray | None, sources: list[CandidateSource] | None = None
    ) -> list[dict[str, Any]]:
        """Response rows: id, score, rank (1-based), candidate source and attributes, in the
        given order."""
        rows = []
        for r, i in enumerate(items.tolist()):
            rows.append(
                {
                    "item_id": self._item_ids[i],
                    "score": float(scores[r]) if scores is not None else None,
                    "rank": r + 1,
                    "source": sources[r] if sources is not None else None,
                    "title": self._titles[i],
                    "genres": self._genres[i],
                }
            )
        return rows

    @classmethod
    def of(cls, version: Any) -> Recommender:
        """From a checked store version (models.lifecycle.store.ModelVersion)."""
        return cls(version.load_tables(), version.params)

    def ranked(self, prepared: Prepared, scores: np.ndarray, k: int) -> list[dict[str, Any]]:
        items, top_scores = top_k(prepared.items, scores, k)
        sources = None
        if prepared.n_cooc is not None:
            n_cooc, n_neighbour = prepared.n_cooc, prepared.n_cooc + prepared.n_ease
            from_cooc = np.isin(items, prepared.items[:n_cooc]).tolist()
            from_ease = np.isin(items, prepared.items[n_cooc:n_neighbour]).tolist()
            sources = [COOCCURRENCE if c else EASE if e else POPULARITY for c, e in zip(from_cooc, from_ease)]
        return self.describe(items, top_scores, sources)

    def popular_described(self, k: int) -> list[dict[str, Any]]:
        """The cold-start fallback's rows: the k most popular items, without scores."""
        items = self.popular(k)
        return self.describe(items, None, [POPULARITY] * len(items))



class LocalRanker:
    """A version's whole pipeline in one process (no services): for replays and references."""

    def __init__(self, recommender: Recommender, booster: Any) -> None:
        self.recommender = recommender
        self._predict = lambda features: predict_scores(booster, features)

    def recommend(self, user_id: str, k: int, exclude_seen: bool) -> list[str]:
        rec = self.recommender
        user = rec.user_index(user_id)
        if user is None:
            return [row["item_id"] for row in rec.popular_described(k)]
        prepared = rec.prepare_recommend(user, exclude_seen)
        return [row["item_id"] for row in rec.ranked(prepared, self._predict(prepared.features), k)]

    def scores(self, user_id: str, item_ids: list[str]) -> np.ndarray:
        """Scores of the given items for this user, in the given order (UnknownItemsError)."""
        rec = self.recommender
        prepared = rec.prepare_rank(rec.user_index(user_id), rec.item_indices(item_ids))
        return self._predict(prepared.features)

    def rank(self, user_id: str, item_ids: list[str]) -> list[str]:
        order = np.argsort(-self.scores(user_id, item_ids), kind="stable")
        return [item_ids[i] for i in order.tolist()]
