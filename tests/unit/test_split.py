"""The per-user temporal split: slices are disjoint, ordered in time, and the history of a
window never contains its labels or anything after them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.core.interactions import InteractionLog, build_log
from training.split import SplitConfig, holdout_sizes, window

N_ITEMS = 100


def random_log(seed: int, n_users: int, max_per_user: int) -> InteractionLog:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_per_user + 1, n_users)
    users = np.repeat([f"u{i}" for i in range(n_users)], counts)
    frame = pd.DataFrame(
        {
            "user_id": users,
            # items unique per user, so a label item identifies its row
            "item_id": np.concatenate([rng.permutation(N_ITEMS)[:c] for c in counts]).astype(str),
            "ts": rng.permutation(len(users)).astype(np.int64),  # unique times
            "rating": np.nan,
        }
    )
    return build_log(frame, np.array([str(i) for i in range(N_ITEMS)]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 30), max_per_user=st.integers(1, 60),
       index=st.integers(0, 3))  # fmt: skip
def test_window_history_is_strictly_before_its_labels(seed: int, n_users: int, max_per_user: int, index: int) -> None:
    log = random_log(seed, n_users, max_per_user)
    config = SplitConfig(min_history=2)
    win = window(log, index, config)
    last_history_ts = np.full(log.n_users, -1)
    np.maximum.at(last_history_ts, win.history.user, win.history.ts)
    sizes = holdout_sizes(log.user_counts(), config)
    for j, user in enumerate(win.label_users):
        labels = win.label_items[win.label_indptr[j] : win.label_indptr[j + 1]]
        assert len(labels) == sizes[user]
        rows = (log.user == user) & np.isin(log.item, labels)
        assert log.ts[rows].min() > last_history_ts[user]
        assert (win.history.user == user).sum() >= config.min_history


def test_windows_are_disjoint_and_adjacent() -> None:
    log = random_log(1, 20, 80)
    config = SplitConfig(holdout_frac=0.1, holdout_max=5, min_history=1)
    pos, n = log.positions()
    h = holdout_sizes(log.user_counts(), config)[log.user]
    owner = np.full(len(log), -1)
    for index in range(3):
        lo, hi = n - h * (index + 1), n - h * index
        in_window = (pos >= lo) & (pos < hi)
        assert (owner[in_window] == -1).all()
        owner[in_window] = index
        # window index+1's history is exactly everything before window index+1's slice
        assert len(window(log, index, config).history) == int((pos < lo).sum())
    assert (owner[pos >= n - h] == 0).all()


@pytest.mark.parametrize(("count", "expected"), [(0, 0), (1, 1), (9, 1), (25, 2), (500, 10)])
def test_holdout_sizes(count: int, expected: int) -> None:
    assert holdout_sizes(np.array([count]), SplitConfig())[0] == expected


@pytest.mark.parametrize("bad", [{"holdout_frac": 0}, {"holdout_frac": 1.5}, {"holdout_max": 0}])
def test_bad_split_config_is_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SplitConfig(**bad)  # type: ignore[arg-type]
