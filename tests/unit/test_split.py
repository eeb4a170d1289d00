"""The splits in time. Temporal (global cutoff): no history row, and so no table entry, is at
or after a window's cutoff, except a labelled user's own rows before their labels. Per-user:
slices are disjoint, ordered in time, and a window's history never contains its labels or
anything after them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.core.interactions import InteractionLog, ItemCatalog, build_log
from models.core.params import CandidateParams
from models.core.tables import build_tables
from training.split import SplitConfig, SplitKind, cutoff_time, holdout_sizes, window

N_ITEMS = 100
CATALOG = ItemCatalog(
    item_ids=np.array([str(i) for i in range(N_ITEMS)]), titles=np.full(N_ITEMS, "t"),
    genres=np.full(N_ITEMS, ""), years=np.full(N_ITEMS, -1.0, dtype=np.float32),
)  # fmt: skip


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
    config = SplitConfig(kind="per_user", min_history=2)
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
    config = SplitConfig(kind="per_user", holdout_frac=0.1, holdout_max=5, min_history=1)
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
    assert holdout_sizes(np.array([count]), SplitConfig(kind="per_user"))[0] == expected


@pytest.mark.parametrize(
    "bad", [{"holdout_frac": 0}, {"holdout_frac": 1.5}, {"holdout_max": 0}, {"online_frac": 1.0},
            {"online_frac": -0.1}, {"kind": "random"}],
)  # fmt: skip
def test_bad_split_config_is_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SplitConfig(**bad)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 30), max_per_user=st.integers(1, 60),
       index=st.integers(0, 3), online_frac=st.sampled_from([0.0, 0.3, 0.5, 0.9]))  # fmt: skip
def test_temporal_window_sees_nothing_after_its_cutoff(
    seed: int, n_users: int, max_per_user: int, index: int, online_frac: float
) -> None:
    log = random_log(seed, n_users, max_per_user)
    config = SplitConfig(holdout_frac=0.15, min_history=2, online_frac=online_frac)
    win = window(log, index, config)
    cutoff = cutoff_time(log, index, config)
    assert win.cutoff == cutoff
    # Item-side history: strictly before the cutoff, and all of it.
    assert (win.history.ts < cutoff).all() and len(win.history) == int((log.ts < cutoff).sum())
    # User-side history: the item-side one plus users' own rows in the slice, each earlier
    # than every label of that user.
    late = win.user_history.ts >= cutoff
    first_label = np.full(log.n_users, np.iinfo(np.int64).max)
    for j, user in enumerate(win.label_users):
        labels = win.label_items[win.label_indptr[j] : win.label_indptr[j + 1]]
        label_ts = log.ts[(log.user == user) & np.isin(log.item, labels)]
        assert label_ts.min() >= cutoff
        if index > 0:
            assert label_ts.max() < cutoff_time(log, index - 1, config)
        first_label[user] = label_ts.min()
        assert (win.user_history.user == user).sum() >= config.min_history
        assert not np.isin(labels, win.user_history.item[win.user_history.user == user]).any()
    owners = win.user_history.user[late]
    labelled = np.isin(owners, win.label_users)
    assert (win.user_history.ts[late][labelled] < first_label[owners[labelled]]).all()
    # The tables of the window: nothing after the cutoff in any item-side entry.
    tables = build_tables(win.history, CATALOG, [], CandidateParams(), user_history=win.user_history)
    assert tables.item_feats[:, 0].sum() == pytest.approx(np.log1p(np.bincount(win.history.item, minlength=N_ITEMS)).sum())
    users_of: dict[int, set[int]] = {}
    for i, u in zip(win.history.item.tolist(), win.history.user.tolist()):
        users_of.setdefault(i, set()).add(u)
    for src in range(N_ITEMS):  # every co-occurring pair was seen together before the cutoff
        for dst in tables.cooc_items[tables.cooc_indptr[src] : tables.cooc_indptr[src + 1]].tolist():
            assert users_of[src] & users_of[dst]


def test_temporal_split_gives_new_users_an_online_history() -> None:
    # 20 users active early; 5 new users who only appear in the last 10% of time.
    rng = np.random.default_rng(0)
    rows = [(f"old{u}", i, int(t)) for u in range(20) for i, t in zip(rng.permutation(N_ITEMS)[:40], rng.integers(0, 900, 40))]
    rows += [(f"new{u}", i, 1000 + k) for u in range(5) for k, i in enumerate(rng.permutation(N_ITEMS)[:18])]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(rating=np.nan)
    log = build_log(frame.astype({"item_id": str}), CATALOG.item_ids)
    config = SplitConfig()
    test = window(log, 0, config)
    new_users = [int(np.flatnonzero(log.user_ids == f"new{u}")[0]) for u in range(5)]
    assert set(new_users) <= set(test.label_users.tolist())  # evaluated, though new after the cutoff
    for user in new_users:  # ...with the first online_frac of their slice as their history
        assert (test.user_history.user == user).sum() == int(np.floor(18 * config.online_frac))
    with pytest.raises(ValueError, match="reach past the first interaction"):
        window(log, 9, config)


@pytest.mark.parametrize("kind", ["temporal", "per_user"])
def test_a_window_kept_as_labels_has_the_same_labels_and_no_histories(kind: SplitKind) -> None:
    win = window(random_log(3, 40, 30), 1, SplitConfig(kind=kind))
    kept = win.labels_only()
    assert len(win.history) > 0 and len(kept.history) == len(kept.user_history) == 0
    for name in ("label_users", "label_indptr", "label_items"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(win, name))
    assert (kept.index, kept.cutoff) == (win.index, win.cutoff)
    np.testing.assert_array_equal(kept.history.user_ids, win.history.user_ids)  # the user index space stays
