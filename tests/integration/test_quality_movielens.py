"""The quality bar on MovieLens ml-latest-small (every rating an interaction): the ranker's
NDCG@10 is >= 1.5x the popularity baseline's and >= 1.10x the co-occurrence baseline's."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.datasets import movielens
from training.pipeline import BASELINE_COOC_KEY, BASELINE_POP_KEY, MODEL_KEY, TrainConfig, train


@pytest.mark.slow
def test_movielens_quality_bar(movielens_dir: Path, fast_config: TrainConfig) -> None:
    ds = movielens(movielens_dir)
    assert len(ds.log) == 100_836 and ds.log.n_users == 610
    result = train(ds, fast_config, save=False)
    m = result.metrics
    print(f"\nMovieLens NDCG@10: model {m[MODEL_KEY]['ndcg']:.4f}, "
          f"co-occurrence {m[BASELINE_COOC_KEY]['ndcg']:.4f}, popularity {m[BASELINE_POP_KEY]['ndcg']:.4f}")  # fmt: skip
    assert m["test_users"] == 610
    assert m[MODEL_KEY]["ndcg"] >= 1.5 * m[BASELINE_POP_KEY]["ndcg"]
    assert m[MODEL_KEY]["ndcg"] >= 1.10 * m[BASELINE_COOC_KEY]["ndcg"]
