"""Splits in time: the test slice (window 0) and the label windows before it.

**temporal** (the default) is a global cutoff in time. Window 0's cutoff leaves the last
`holdout_frac` of all interactions after it; window w's cutoff is another `holdout_frac`
earlier. A window's item-side history (popularity, co-occurrence, item features, retrieval)
is everything before its cutoff, so nothing any user did later reaches a feature. Its users
are those active between its cutoff and the next one. The first `online_frac` of each such
user's own interactions in the slice join that user's history, like the events a live service
hears. That makes users who are new after the cutoff (most of them, on real data) evaluable.
The rest of the slice is the user's labels.

**per_user** is the older split: each user's latest `h` interactions are the test slice, the
`h` before them label window 1, and so on, with `h` a fraction of the user's interactions.
Features of a user's test slice then see other users' later interactions, which makes offline
figures optimistic. It is kept for comparison, named as such.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np

from models.core.interactions import InteractionLog

SplitKind = Literal["temporal", "per_user"]
SPLIT_KINDS: tuple[str, ...] = get_args(SplitKind)


@dataclass(frozen=True)
class SplitConfig:
    kind: SplitKind = "temporal"
    holdout_frac: float = 0.1  # temporal: of all interactions per window; per_user: of each user's
    holdout_max: int = 10  # per_user: the most items in one user's slice
    min_history: int = 3  # a user needs this many past items to get labels in a window
    online_frac: float = 0.5  # temporal: share of a user's slice that joins their history

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"split kind must be one of {list(SPLIT_KINDS)}, got {self.kind!r}")
        if not 0 < self.holdout_frac < 1:
            raise ValueError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if not 0 <= self.online_frac < 1:
            raise ValueError(f"online_frac must be in [0, 1), got {self.online_frac}")
        if self.holdout_max < 1 or self.min_history < 1:
            raise ValueError("holdout_max and min_history must be >= 1")


@dataclass(frozen=True)
class Window:
    """One slice: what features may see, and the label rows per user.

    `history` feeds the item-side tables; `user_history` adds what each labelled user did
    in the slice before their labels (temporal split) and feeds the user-side tables. For the
    per-user split the two are the same log."""

    index: int
    history: InteractionLog
    user_history: InteractionLog
    label_users: np.ndarray  # int32, users that get labels in this window
    label_indptr: np.ndarray  # CSR over label_users into label_items
    label_items: np.ndarray  # int32
    cutoff: int | None = None  # temporal: history is strictly before this time (seconds)

    def labels_only(self) -> Window:
        """The window without its two histories (empty logs): what is kept of a window once
        its tables are built from them (at ml-25m's size the two are 0.8 GB a window)."""
        empty = self.history.subset(np.zeros(len(self.history), dtype=bool))
        return replace(self, history=empty, user_history=empty)


def holdout_sizes(counts: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Per-user slice size h of the per-user split (0 for users with no interactions)."""
    h = np.clip(np.round(counts * config.holdout_frac), 1, config.holdout_max).astype(np.int64)
    return np.where(counts > 0, h, 0)


def cutoff_time(log: InteractionLog, index: int, config: SplitConfig) -> int:
    """Window `index`'s cutoff: the time before which (1 - (index+1) * holdout_frac) of the
    interactions fall. Raises ValueError when the windows would reach past the start."""
    share = 1.0 - (index + 1) * config.holdout_frac
    if share <= 0:
        raise ValueError(
            f"window {index}: {index + 1} windows of holdout_frac {config.holdout_frac} reach past "
            "the first interaction (rule: (windows + 1) * holdout_frac < 1)"
        )
    # The first time with at least `share` of the rows strictly before it.
    ts = np.sort(log.ts)
    return int(ts[min(int(np.ceil(share * len(ts))), len(ts) - 1)])


def window(log: InteractionLog, index: int, config: SplitConfig) -> Window:
    """Window `index` (0 = test). Users whose history would be shorter than min_history get
    no labels but still contribute their history to the tables of this window."""
    if config.kind == "per_user":
        return _per_user_window(log, index, config)
    return _temporal_window(log, index, config)


def _labels(log: InteractionLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, counts = np.unique(log.user[rows], return_counts=True)
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return users.astype(np.int32), indptr, log.item[rows].astype(np.int32)


def _temporal_window(log: InteractionLog, index: int, config: SplitConfig) -> Window:
    if len(log) == 0:
        empty = np.zeros(0, dtype=np.int32)
        return Window(index, log, log, empty, np.zeros(1, dtype=np.int64), empty)
    lo = cutoff_time(log, index, config)
    hi = cutoff_time(log, index - 1, config) if index > 0 else None
    before = log.ts < lo
    in_slice = ~before if hi is None else (~before & (log.ts < hi))
    # Rows are sorted by (user, ts), so a user's rows in the slice are contiguous and in time
    # order: their position among the user's slice rows says online part or label.
    rows = np.flatnonzero(in_slice)
    per_user = np.bincount(log.user[rows], minlength=log.n_users)
    starts = np.concatenate(([0], np.cumsum(per_user)[:-1]))
    pos = np.arange(len(rows)) - starts[log.user[rows]]
    online_n = np.floor(per_user * config.online_frac).astype(np.int64)
    online = np.zeros(len(log), dtype=bool)
    online[rows] = pos < online_n[log.user[rows]]
    user_history = log.subset(before | online)
    history_len = user_history.user_counts()
    label = in_slice & ~online & (history_len[log.user] >= config.min_history)
    users, indptr, items = _labels(log, label)
    return Window(index, log.subset(before), user_history, users, indptr, items, cutoff=lo)


def _per_user_window(log: InteractionLog, index: int, config: SplitConfig) -> Window:
    pos, n = log.positions()
    h = holdout_sizes(log.user_counts(), config)[log.user]
    start = n - h * (index + 1)
    end = n - h * index
    history = log.subset(pos < start)
    in_slice = (pos >= start) & (pos < end) & (start >= config.min_history)
    users, indptr, items = _labels(log, in_slice)
    return Window(index, history, history, users, indptr, items)


def sample_label_users(win: Window, n: int, rng: np.random.Generator) -> Window:
    """The window with at most `n` of its labelled users (a seeded uniform draw, kept in
    order); the same window when it has no more than `n`."""
    if n < 1:
        raise ValueError(f"sample_label_users: n must be >= 1, got {n}")
    if len(win.label_users) <= n:
        return win
    keep = np.sort(rng.choice(len(win.label_users), n, replace=False))
    sizes = np.diff(win.label_indptr)[keep]
    items = np.concatenate([win.label_items[win.label_indptr[j] : win.label_indptr[j + 1]] for j in keep.tolist()])
    indptr = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    return replace(win, label_users=win.label_users[keep], label_indptr=indptr, label_items=items.astype(np.int32))
