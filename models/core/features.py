"""Feature building: one (n_items, N_FEATURES) float32 matrix per user, columns in schema order.

Training and serving call the same function, so the two cannot disagree on a feature.
"""

from __future__ import annotations

import numpy as np

from models.core.candidates import CoocScores
from models.core.schema import FEATURE_DTYPE, FEATURE_INDEX, ITEM_FEATURES, N_FEATURES, USER_FEATURES
from models.core.tables import UNKNOWN_YEAR, ServingTables

_USER_COLS = [FEATURE_INDEX[n] for n in USER_FEATURES]
_ITEM_COLS = [FEATURE_INDEX[n] for n in ITEM_FEATURES]
_UNKNOWN_USER = np.zeros(len(USER_FEATURES), dtype=FEATURE_DTYPE)
_UNKNOWN_USER[USER_FEATURES.index("user_mean_year")] = UNKNOWN_YEAR
COOC_RANK_NONE = 1000.0  # the rank given to items the user's recent items never co-occur with


def build_features(
    tables: ServingTables, user: int | None, items: np.ndarray, cooc: CoocScores
) -> np.ndarray:
    """Features of `items` for `user` (None: a user with no history) in schema order."""
    n = len(items)
    out = np.empty((n, N_FEATURES), dtype=FEATURE_DTYPE)
    user_row = tables.user_feats[user] if user is not None else _UNKNOWN_USER
    out[:, _USER_COLS] = user_row
    item_rows = tables.item_feats[items]
    out[:, _ITEM_COLS] = item_rows

    pos, found = cooc.lookup(items)
    if len(cooc.items):
        out[:, FEATURE_INDEX["cooc_score"]] = np.where(found, cooc.score[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_max"]] = np.where(found, cooc.best[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_last"]] = np.where(found, cooc.last[pos], 0.0)
        out[:, FEATURE_INDEX["cooc_rank"]] = np.where(
            found, np.minimum(cooc.rank[pos], COOC_RANK_NONE), COOC_RANK_NONE
        )
    else:
        out[:, [FEATURE_INDEX[c] for c in ("cooc_score", "cooc_max", "cooc_last")]] = 0.0
        out[:, FEATURE_INDEX["cooc_rank"]] = COOC_RANK_NONE
    out[:, FEATURE_INDEX["pop_rank"]] = np.log1p(tables.pop_rank[items])

    if user is not None:
        out[:, FEATURE_INDEX["genre_affinity"]] = tables.item_genre[items] @ tables.user_genre[user]
    else:
        out[:, FEATURE_INDEX["genre_affinity"]] = 0.0
    item_year = item_rows[:, ITEM_FEATURES.index("item_year")]
    user_year = user_row[USER_FEATURES.index("user_mean_year")]
    known = (item_year >= 0) & (user_year >= 0)
    out[:, FEATURE_INDEX["year_gap"]] = np.where(known, np.abs(item_year - user_year), -1.0)
    return out
