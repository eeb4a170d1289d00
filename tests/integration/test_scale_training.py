"""Training beyond one process: the partitioned synthetic generator, and the Dask engine on
a LocalCluster with 2 workers against the in-process engine on the same data."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import small_synthetic
from training.dask_engine import DaskEngine
from training.datasets import interactions, synthetic, synthetic_partitions, write_synthetic
from training.pipeline import TrainConfig, train


def test_partitions_hold_disjoint_users_and_add_up() -> None:
    items, parts = synthetic_partitions(n_users=1000, n_items=300, n_interactions=50_000, n_partitions=5)
    frames = list(parts)
    users = [set(f["user_id"]) for f in frames]
    assert len(frames) == 5 and sum(len(u) for u in users) == len(set().union(*users)) == 1000
    # As many interactions as the one-block generator makes at this size (draws minus repeats).
    single = len(synthetic(n_users=1000, n_items=300, n_interactions=50_000).log)
    assert 0.9 * single <= sum(len(f) for f in frames) <= 1.1 * single
    assert set(pd.concat(frames)["item_id"]) <= set(items["item_id"])


def test_partitions_are_generated_one_at_a_time() -> None:
    """Memory follows one partition, not the total: a partition is made only when asked for."""
    _, parts = synthetic_partitions(n_users=20_000, n_items=2000, n_interactions=2_000_000, n_partitions=20)
    tracemalloc.start()
    first = next(parts)
    one = tracemalloc.get_traced_memory()[1]
    del first
    tracemalloc.reset_peak()
    for part in parts:
        del part
    peak_rest = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak_rest < 3 * one  # 19 more partitions, the peak of about one


def test_a_written_partitioned_data_set_trains(tmp_path: Path) -> None:
    folder, items = write_synthetic(tmp_path, n_users=600, n_items=300, n_interactions=30_000, n_partitions=3)
    assert len(list(folder.glob("part-*.parquet"))) == 3
    dataset = interactions(folder, user_col="user_id", item_col="item_id", time_col="ts",
                           rating_col="rating", items_path=items)  # fmt: skip
    result = train(dataset, TrainConfig(tune_budget_s=0), save=False)
    assert result.metrics["model"]["ndcg"] > result.metrics["baseline_cooccurrence"]["ndcg"]


@pytest.mark.slow
def test_dask_engine_meets_the_single_process_bar() -> None:
    dataset = small_synthetic()
    local = train(dataset, TrainConfig(tune_budget_s=0), save=False)  # the base, as the Dask engine fits
    with DaskEngine(n_workers=2, users_per_task=150) as engine:
        assert len(engine.client.scheduler_info()["workers"]) == 2
        distributed = train(dataset, TrainConfig(tune_budget_s=0), save=False, engine=engine)
    m_local, m_dask = local.metrics, distributed.metrics
    assert m_dask["model"]["ndcg"] > m_dask["baseline_cooccurrence"]["ndcg"]  # the same quality bar
    assert m_dask["model"]["ndcg"] == pytest.approx(m_local["model"]["ndcg"], abs=0.02)
    # The same labelled groups, built on the workers instead of here.
    assert distributed.metadata["dataset"]["train_groups"] == local.metadata["dataset"]["train_groups"]
    assert distributed.metadata["params"]["engine"].startswith("dask")
