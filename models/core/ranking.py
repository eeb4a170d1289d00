"""Ordering scored items: the last step of a recommendation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xgboost as xgb


def top_k(items: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best items by score, best first; ties keep the items' given order."""
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} items but {len(scores)} scores")
    k = min(k, len(items))
    if k <= 0:
        return items[:0], scores[:0]
    # Stable sort on -score: equal scores stay in candidate order (co-occurrence first).
    order = np.argsort(-scores, kind="stable")[:k]
    return items[order], scores[order]


def predict_scores(booster: xgb.Booster, features: np.ndarray) -> np.ndarray:
    """Relevance scores for a float32 feature matrix in schema order (higher is better)."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(booster.inplace_predict(features), dtype=np.float32).reshape(-1)
