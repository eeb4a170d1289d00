"""Per-user temporal split.

Each user's latest `h` interactions are the test slice (window 0); the `h` before them are
label window 1, the `h` before those window 2, and so on. The history of window w is
everything before its slice, per user, so features never see the future of what they label.
`h` is a fraction of the user's interactions, at least 1 and at most `holdout_max`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.core.interactions import InteractionLog


@dataclass(frozen=True)
class SplitConfig:
    holdout_frac: float = 0.1
    holdout_max: int = 10
    min_history: int = 3  # a user needs this many past items to get labels in a window

    def __post_init__(self) -> None:
        if not 0 < self.holdout_frac < 1:
            raise ValueError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.holdout_max < 1 or self.min_history < 1:
            raise ValueError("holdout_max and min_history must be >= 1")


@dataclass(frozen=True)
class Window:
    """One slice: its history (what features may see) and the label rows per user."""

    index: int
    history: InteractionLog
    label_users: np.ndarray  # int32, users that get labels in this window
    label_indptr: np.ndarray  # CSR over label_users into label_items
    label_items: np.ndarray  # int32


def holdout_sizes(counts: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Per-user slice size h (0 for users with no interactions)."""
    h = np.clip(np.round(counts * config.holdout_frac), 1, config.holdout_max).astype(np.int64)
    return np.where(counts > 0, h, 0)


def window(log: InteractionLog, index: int, config: SplitConfig) -> Window:
    """Window `index` (0 = test). Users whose history would be shorter than min_history get
    no labels but still contribute their history to the tables of this window."""
    pos, n = log.positions()
    h = holdout_sizes(log.user_counts(), config)[log.user]
    start = n - h * (index + 1)
    end = n - h * index
    history = log.subset(pos < start)
    in_slice = (pos >= start) & (pos < end) & (start >= config.min_history)
    users = log.user[in_slice]
    items = log.item[in_slice]
    label_users, counts = np.unique(users, return_counts=True)
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return Window(index, history, label_users.astype(np.int32), indptr, items.astype(np.int32))
