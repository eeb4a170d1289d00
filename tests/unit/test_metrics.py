"""Ranking metrics against hand-computed values and their invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.core.metrics import METRIC_NAMES, mean_metrics, ranking_metrics


@pytest.mark.parametrize(
    ("recommended", "relevant", "k", "expected"),
    [
        ([1, 2, 3], {1}, 3, {"ndcg": 1.0, "recall": 1.0, "hitrate": 1.0, "map": 1.0}),
        ([4, 5, 6], {1}, 3, {"ndcg": 0.0, "recall": 0.0, "hitrate": 0.0, "map": 0.0}),
        # hit at rank 2 of 2 relevant: dcg = 1/log2(3); idcg = 1 + 1/log2(3)
        ([9, 1, 8], {1, 2}, 3, {"ndcg": (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
                                "recall": 0.5, "hitrate": 1.0, "map": (1 / 2) / 2}),
        # only the top k count
        ([9, 8, 1], {1}, 2, {"ndcg": 0.0, "recall": 0.0, "hitrate": 0.0, "map": 0.0}),
        ([], {1}, 10, {"ndcg": 0.0, "recall": 0.0, "hitrate": 0.0, "map": 0.0}),
        ([1], set(), 10, {"ndcg": 0.0, "recall": 0.0, "hitrate": 0.0, "map": 0.0}),
    ],
)
def test_known_values(recommended: list[int], relevant: set[int], k: int, expected: dict[str, float]) -> None:
    got = ranking_metrics(recommended, relevant, k)
    assert got == pytest.approx(expected)


@given(
    st.lists(st.integers(0, 30), max_size=15, unique=True),
    st.sets(st.integers(0, 30), max_size=10),
    st.integers(1, 12),
)
def test_metrics_are_bounded_and_consistent(recommended: list[int], relevant: set[int], k: int) -> None:
    m = ranking_metrics(recommended, relevant, k)
    assert all(0.0 <= m[name] <= 1.0 + 1e-9 for name in METRIC_NAMES)
    hits = len(set(recommended[:k]) & relevant)
    assert m["hitrate"] == float(hits > 0)
    assert (m["ndcg"] > 0) == (hits > 0) == (m["map"] > 0)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True))
def test_perfect_ranking_scores_one(items: list[int]) -> None:
    m = ranking_metrics(items, set(items), len(items))
    assert m == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0))


def test_mean_metrics_averages_users() -> None:
    rows = [ranking_metrics([1], {1}, 1), ranking_metrics([2], {1}, 1)]
    assert mean_metrics(rows) == pytest.approx(dict.fromkeys(METRIC_NAMES, 0.5))
