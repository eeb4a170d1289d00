"""Training at scale: the partitioned synthetic generator (and its ml-25m shape), lean
training rows chosen on validation, and the Dask engine on a LocalCluster with 2 workers
against the in-process engine on the same data."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import small_synthetic
from training.__main__ import GENERATE_SHAPES, generate_main
from training.dask_engine import DaskEngine
from training.datasets import interactions, synthetic, synthetic_partitions, write_synthetic
from training.pipeline import TrainConfig, train
from training.rows import RowSearch, sampling_grid


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


def test_lean_rows_are_chosen_on_validation_and_reported() -> None:
    """With the search forced on (no full-rows budget), the run measures the samplings on its
    pilot groups and the doubling groups, trains on what it chose, and keeps both curves."""
    base = TrainConfig()
    config = replace(base, tune_budget_s=0, rows=RowSearch(pilot_groups=100, full_rows_budget=0))
    result = train(small_synthetic(), config, save=False)
    plan = result.metadata["training_rows"]
    full_rows = next(c["rows"] for c in plan["sampling_curve"] if c["hard"] == -1)
    chosen = next(c for c in plan["sampling_curve"] if c["sampling"] == plan["sampling"]["describe"])
    best = max(c["ndcg"] for c in plan["sampling_curve"])
    assert len(plan["sampling_curve"]) == 1 + len(sampling_grid(base.k))
    assert chosen["rows"] <= full_rows and best - chosen["ndcg"] <= config.rows.z * chosen["se"] + 1e-12
    assert plan["groups_curve"][0]["pairs"] == 100 and plan["used_pairs"] <= plan["available_pairs"]
    assert result.metadata["dataset"]["train_groups"] == plan["train_groups"] == plan["groups_curve"][-1]["groups"]
    assert result.metrics["model"]["ndcg"] > result.metrics["baseline_cooccurrence"]["ndcg"]
    assert set(result.peak_rss_mb) == set(result.timings)


def test_small_data_keeps_every_candidate_within_the_full_rows_budget() -> None:
    result = train(small_synthetic(), TrainConfig(tune_budget_s=0), save=False)
    assert "training_rows" not in result.metadata  # the full training, as before the search


def test_generate_has_the_ml_25m_shape_and_sizes_override_it(tmp_path: Path) -> None:
    assert GENERATE_SHAPES["ml-25m"][:2] == (162_541, 59_047)
    code = generate_main(["--out", str(tmp_path), "--shape", "ml-25m", "--n-users", "300", "--n-items", "200",
                          "--n-interactions", "6000", "--partitions", "2"])  # fmt: skip
    assert code == 0
    frame = pd.read_parquet(tmp_path / "interactions")
    assert frame["user_id"].nunique() == 300 and frame["item_id"].nunique() <= 200
    assert not frame.duplicated(["user_id", "item_id"]).any()
