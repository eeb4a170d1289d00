"""Top-k ranking metrics with binary relevance: NDCG, Recall, HitRate and MAP at k."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

METRIC_NAMES = ("ndcg", "recall", "hitrate", "map")


def ranking_metrics(recommended: Sequence[int], relevant: Iterable[int], k: int) -> dict[str, float]:
    """Metrics of one ranked list against the set of relevant items (empty set: all zero)."""
    rel_set = set(int(x) for x in relevant)
    top = [int(x) for x in recommended[:k]]
    if not rel_set:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    hits = np.array([x in rel_set for x in top], dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, len(top) + 2))
    n_ideal = min(len(rel_set), k)
    ideal = (1.0 / np.log2(np.arange(2, n_ideal + 2))).sum()
    precision_at = np.cumsum(hits) / np.arange(1, len(top) + 1) if len(top) else hits
    return {
        "ndcg": float((hits * discounts).sum() / ideal),
        "recall": float(hits.sum() / len(rel_set)),
        "hitrate": float(hits.any()),
        "map": float((precision_at * hits).sum() / n_ideal),
    }


def mean_metrics(per_user: list[dict[str, float]]) -> dict[str, float]:
    if not per_user:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    return {m: float(np.mean([row[m] for row in per_user])) for m in METRIC_NAMES}


def overlap_at_k(a: list[str], b: list[str], k: int) -> float:
    """Share of the first k of `a` that are in the first k of `b`."""
    head = a[:k]
    return len(set(head) & set(b[:k])) / len(head) if head else 1.0


def rank_correlation(order: list[str], scores_of_order: np.ndarray) -> float:
    """Spearman correlation between a served order (best first) and another model's scores
    of the same items: 1 when it would order them the same way, -1 reversed."""
    n = len(order)
    if n < 2:
        return 1.0
    served_rank = np.arange(n, dtype=np.float64)
    other_rank = np.empty(n, dtype=np.float64)
    other_rank[np.argsort(-np.asarray(scores_of_order), kind="stable")] = np.arange(n)
    d = served_rank - other_rank
    return float(1.0 - 6.0 * np.sum(d * d) / (n * (n * n - 1)))
