"""The quality bar on MovieLens ml-latest-small (every rating an interaction), under both
splits: the ranker's NDCG@10 is >= 1.5x the popularity baseline's and >= 1.10x the
co-occurrence baseline's. (The comparison with EASE, ALS and ItemKNN is bench/quality.py's.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from training.datasets import movielens
from training.pipeline import BASELINE_COOC_KEY, BASELINE_POP_KEY, MODEL_KEY, TrainConfig, train
from training.split import SplitConfig, window


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["temporal", "per_user"])
def test_movielens_quality_bar(movielens_dir: Path, fast_config: TrainConfig, kind: str) -> None:
    ds = movielens(movielens_dir)
    assert len(ds.log) == 100_836 and ds.log.n_users == 610
    config = dataclasses.replace(fast_config, split=SplitConfig(kind=kind))  # type: ignore[arg-type]
    result = train(ds, config, save=False)
    m = result.metrics
    print(f"\nMovieLens, {kind} split, {m['test_users']} test users, NDCG@10: model {m[MODEL_KEY]['ndcg']:.4f}, "
          f"co-occurrence {m[BASELINE_COOC_KEY]['ndcg']:.4f}, popularity {m[BASELINE_POP_KEY]['ndcg']:.4f}")  # fmt: skip
    assert m["test_users"] == len(window(ds.log, 0, config.split).label_users)
    if kind == "per_user":
        assert m["test_users"] == 610
    else:  # the users active in the last 10% of time, far fewer than all
        assert 20 <= m["test_users"] < 610
        assert result.test_window is not None and result.test_window.cutoff is not None
        assert np.all(result.test_window.history.ts < result.test_window.cutoff)
    assert m[MODEL_KEY]["ndcg"] >= 1.5 * m[BASELINE_POP_KEY]["ndcg"]
    assert m[MODEL_KEY]["ndcg"] >= 1.10 * m[BASELINE_COOC_KEY]["ndcg"]
