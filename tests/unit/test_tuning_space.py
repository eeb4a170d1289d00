"""The ranker's search space: every draw inside its ranges, scaled by the data (rows per
group, k), the base's fixed parameters kept, and the draws a function of the seed alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import tuning
from training.ranker import RankerParams
from training.tuning import sample_params

BASE = dataclasses.replace(RankerParams(), n_estimators=123, early_stopping_rounds=7)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows_per_group=st.floats(1.0, 10_000.0), k=st.integers(1, 100))
def test_every_draw_is_inside_the_space_scaled_by_the_data(seed: int, rows_per_group: float, k: int) -> None:
    p = sample_params(np.random.default_rng(seed), BASE, rows_per_group, k)
    assert tuning.MAX_DEPTH[0] <= p.max_depth <= tuning.MAX_DEPTH[1]
    low, high = tuning.MIN_CHILD_WEIGHT_PER_GROUP_ROW
    assert low * rows_per_group * 0.999 <= p.min_child_weight <= high * rows_per_group * 1.001 + 1e-3
    assert tuning.LEARNING_RATE[0] * 0.999 <= p.learning_rate <= tuning.LEARNING_RATE[1] * 1.001
    assert tuning.REG_LAMBDA[0] * 0.999 <= p.reg_lambda <= tuning.REG_LAMBDA[1] * 1.001
    assert tuning.SUBSAMPLE[0] <= p.subsample <= tuning.SUBSAMPLE[1]
    assert tuning.COLSAMPLE_BYTREE[0] <= p.colsample_bytree <= tuning.COLSAMPLE_BYTREE[1]
    assert 1 <= p.lambdarank_num_pair_per_sample <= max(rows_per_group, 1)
    assert p.lambdarank_num_pair_per_sample <= max(round(k * tuning.PAIRS_PER_K[1]), 1)
    fixed = ("objective", "n_estimators", "lambdarank_pair_method", "early_stopping_rounds")
    assert all(getattr(p, name) == getattr(BASE, name) for name in fixed)


def test_min_child_weight_scales_with_the_rows_of_a_group() -> None:
    small, large = (sample_params(np.random.default_rng(5), BASE, rows, 10) for rows in (200.0, 20_000.0))
    assert large.min_child_weight == pytest.approx(100 * small.min_child_weight, rel=1e-3)
    assert dataclasses.replace(large, min_child_weight=0) == dataclasses.replace(small, min_child_weight=0)


def test_the_draws_depend_on_the_seed_alone() -> None:
    def draws(seed: int) -> list[RankerParams]:
        rng = np.random.default_rng(seed)
        return [sample_params(rng, BASE, 200.0, 10) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert len(set(draws(1))) == 20
