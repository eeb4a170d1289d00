"""Ordering scored items: the last step of a recommendation."""

from __future__ import annotations

import numpy as np


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
