"""Feature building: one (n_items, N_FEATURES) float32 matrix per user, columns in schema order.

Training and serving call the same function, so the two cannot disagree on a feature.
"""

from __future__ import annotations

import numpy as np

from models.core.candidates import UserScores
from models.core.schema import FEATURE_DTYPE, FEATURE_INDEX, ITEM_FEATURES, N_FEATURES, USER_FEATURES
from models.core.tables import UNKNOWN_YEAR, ServingTables, one_user_profile

_USER_COLS = [FEATURE_INDEX[n] for n in USER_FEATURES]
_ITEM_COLS = [FEATURE_INDEX[n] for n in ITEM_FEATURES]
_UNKNOWN_USER = np.zeros(len(USER_FEATURES), dtype=FEATURE_DTYPE)
_UNKNOWN_USER[USER_FEATURES.index("user_mean_year")] = UNKNOWN_YEAR
# The rank given to items a neighbour source did not score for this user (and the cap of
# every rank: beyond the candidate budget, rank differences carry no information).
RANK_NONE = 1000.0


_LOG_POP = ITEM_FEATURES.index("item_log_pop")
_YEAR = ITEM_FEATURES.index("item_year")
Profile = tuple[np.ndarray, np.ndarray]  # a user's feature row and genre profile


def user_profile(tables: ServingTables, user: int | None, online: np.ndarray | None = None,
                 ) -> Profile | None:  # fmt: skip
    """The user's feature row and genre profile: the trained ones when there are no online
    items, else computed from the merged history (trained items, then `online`) as training
    computes them (tables.user_profiles). None for a user with no history at all."""
    if online is None or len(online) == 0:
        return None if user is None else (tables.user_feats[user], tables.user_genre[user])
    trained = tables.history(user) if user is not None else np.zeros(0, dtype=np.int32)
    items = np.concatenate((trained, online)).astype(np.intp)
    return one_user_profile(items, tables.item_feats[:, _LOG_POP], tables.item_feats[:, _YEAR], tables.item_genre)


def build_features(
    tables: ServingTables, user: int | None, items: np.ndarray, scores: UserScores,
    online: np.ndarray | None = None, profile: Profile | None = None,
) -> np.ndarray:
    """Features of `items` for `user` (None: a user with no trained history) in schema
    order; `scores` are the user's neighbour scores from candidate generation, `online` the
    user's items since training (catalog indices), merged into the user features. `profile`:
    `user_profile(tables, user, online)` when the caller has it already."""
    n = len(items)
    out = np.empty((n, N_FEATURES), dtype=FEATURE_DTYPE)
    if profile is None:
        profile = user_profile(tables, user, online)
    user_row = profile[0] if profile is not None else _UNKNOWN_USER
    out[:, _USER_COLS] = user_row
    item_rows = tables.item_feats[items]
    out[:, _ITEM_COLS] = item_rows

    cooc = scores.cooc
    pos, found = cooc.lookup(items)
    if len(cooc.items):
        out[:, FEATURE_INDEX["cooc_score"]] = np.where(found, cooc.score[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_max"]] = np.where(found, cooc.best[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_last"]] = np.where(found, cooc.last[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_rank"]] = np.where(found, np.minimum(cooc.rank[pos], RANK_NONE), RANK_NONE)
    else:
        out[:, [FEATURE_INDEX[c] for c in ("cooc_score", "cooc_max", "cooc_last")]] = 0.0
        out[:, FEATURE_INDEX["cooc_rank"]] = RANK_NONE
    ease = scores.ease
    pos, found = ease.lookup(items)
    if len(ease.items):
        out[:, FEATURE_INDEX["ease_score"]] = np.where(found, ease.score[pos], 0.0)
        out[:, FEATURE_INDEX["ease_rank"]] = np.where(found, np.minimum(ease.rank[pos], RANK_NONE), RANK_NONE)
    else:
        out[:, FEATURE_INDEX["ease_score"]] = 0.0
        out[:, FEATURE_INDEX["ease_rank"]] = RANK_NONE
    out[:, FEATURE_INDEX["pop_rank"]] = np.log1p(tables.pop_rank[items])

    if profile is not None:
        out[:, FEATURE_INDEX["genre_affinity"]] = tables.item_genre[items] @ profile[1]
    else:
        out[:, FEATURE_INDEX["genre_affinity"]] = 0.0
    item_year = item_rows[:, ITEM_FEATURES.index("item_year")]
    user_year = user_row[USER_FEATURES.index("user_mean_year")]
    known = (item_year >= 0) & (user_year >= 0)
    out[:, FEATURE_INDEX["year_gap"]] = np.where(known, np.abs(item_year - user_year), -1.0)
    return out
