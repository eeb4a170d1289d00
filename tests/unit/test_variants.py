"""Champion/challenger routing, the agreement measures of shadow and replay, and the
retraining gate: pure functions, no store and no server."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.core.metrics import overlap_at_k, rank_correlation
from models.serving.variants import routes_to_challenger, user_bucket
from training.lifecycle import decide

USERS = [f"u{i}" for i in range(5000)]


@pytest.mark.parametrize("share", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_split_share_is_observed_within_tolerance(share: float) -> None:
    routed = np.mean([routes_to_challenger(u, share, "recsys") for u in USERS])
    sd = np.sqrt(share * (1 - share) / len(USERS))
    assert abs(routed - share) <= 4 * sd + 1e-12


def test_a_user_is_always_routed_the_same_way_and_the_salt_redraws() -> None:
    first = [routes_to_challenger(u, 0.3, "recsys") for u in USERS]
    assert first == [routes_to_challenger(u, 0.3, "recsys") for u in USERS]
    other_salt = [routes_to_challenger(u, 0.3, "experiment-2") for u in USERS]
    assert 0.3 < np.mean(np.array(first) != np.array(other_salt)) < 0.5  # independent draws: 2·0.3·0.7
    # Raising the share only adds users: nobody in the 10% group leaves at 30%.
    assert all(b for a, b in zip((routes_to_challenger(u, 0.1, "recsys") for u in USERS), first) if a)


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_user_bucket_is_the_same_in_every_process(hash_seed: str) -> None:
    """Workers and restarts must agree: another interpreter, with another str-hash salt,
    puts users in the same buckets (Python's hash() would not)."""
    code = "from models.serving.variants import user_bucket; print(repr([user_bucket(f'u{i}', 'recsys') for i in range(50)]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert ast.literal_eval(out.stdout) == [user_bucket(f"u{i}", "recsys") for i in range(50)]


@pytest.mark.parametrize(
    ("a", "b", "k", "expected"),
    [(["x", "y", "z"], ["z", "y", "x"], 3, 1.0), (["x", "y"], ["p", "q"], 2, 0.0),
     (["x", "y", "z", "w"], ["x", "q", "r", "s"], 2, 0.5), ([], ["x"], 10, 1.0)],
)  # fmt: skip
def test_overlap_at_k(a: list[str], b: list[str], k: int, expected: float) -> None:
    assert overlap_at_k(a, b, k) == expected


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([3.0, 2.0, 1.0, 0.0], 1.0), ([0.0, 1.0, 2.0, 3.0], -1.0), ([2.0, 3.0, 1.0, 0.0], 0.8)],
)
def test_rank_correlation_is_spearman(scores: list[float], expected: float) -> None:
    assert rank_correlation(["a", "b", "c", "d"], np.asarray(scores)) == pytest.approx(expected)


def metrics(model: float, cooc: float = 0.2) -> dict[str, dict[str, float]]:
    return {"model": {"ndcg": model}, "baseline_cooccurrence": {"ndcg": cooc}}


@pytest.mark.parametrize(
    ("challenger", "champion", "promote"),
    [
        (metrics(0.30), metrics(0.30), True),  # equal
        (metrics(0.297), metrics(0.30), True),  # within the margin
        (metrics(0.29), metrics(0.30), False),  # worse by more than the margin
        (metrics(0.40), metrics(0.30), True),  # better
        (metrics(0.30), None, True),  # no champion yet
        (metrics(0.19, cooc=0.2), None, False),  # learned nothing: no better than its candidates
        (metrics(0.19, cooc=0.2), metrics(0.1), False),  # ... even against a weak champion
    ],
)
def test_promotion_gate(challenger: dict, champion: dict | None, promote: bool) -> None:
    decision = decide(challenger, champion, margin=0.005)
    assert decision.promote is promote
    assert decision.reason and decision.as_record()["challenger_ndcg"] == challenger["model"]["ndcg"]
