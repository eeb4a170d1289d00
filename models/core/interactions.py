"""Interaction logs and item catalogs in the dense-index form the recommender works on.

External ids (strings) are mapped once to contiguous indices; everything downstream is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ItemCatalog:
    """Every item the model knows, with its attributes. Row i describes item index i."""

    item_ids: np.ndarray  # str, unique
    titles: np.ndarray  # str
    genres: np.ndarray  # str, "|"-separated ("" when unknown)
    years: np.ndarray  # float32, -1 when unknown

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if not (len(self.titles) == len(self.genres) == len(self.years) == n):
            raise ValueError("ItemCatalog columns must have the same length")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def genre_names(self) -> list[str]:
        names: set[str] = set()
        for g in self.genres:
            names.update(x for x in str(g).split("|") if x and x != "(no genres listed)")
        return sorted(names)

    def genre_matrix(self, genre_names: list[str]) -> np.ndarray:
        """Multi-hot (n_items, n_genres) float32 matrix, rows scaled to unit length."""
        col = {g: j for j, g in enumerate(genre_names)}
        mat = np.zeros((self.n_items, len(genre_names)), dtype=np.float32)
        for i, g in enumerate(self.genres):
            for name in str(g).split("|"):
                j = col.get(name)
                if j is not None:
                    mat[i, j] = 1.0
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        return np.divide(mat, norms, out=np.zeros_like(mat), where=norms > 0)


@dataclass(frozen=True)
class InteractionLog:
    """Interactions sorted by (user, timestamp); `user`/`item` index `user_ids`/the catalog."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    ts: np.ndarray  # int64, seconds
    rating: np.ndarray  # float32, NaN when the source has no rating
    user_ids: np.ndarray  # str, unique

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask: np.ndarray) -> InteractionLog:
        """The rows where mask is true; the user index space is kept."""
        return InteractionLog(
            self.user[mask], self.item[mask], self.ts[mask], self.rating[mask], self.user_ids
        )

    def user_counts(self) -> np.ndarray:
        return np.bincount(self.user, minlength=self.n_users)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's position in its user's timeline, and that user's number of rows."""
        counts = self.user_counts()
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(len(self.user)) - starts[self.user]
        return pos, counts[self.user]


def build_log(
    frame: pd.DataFrame, item_ids: np.ndarray
) -> InteractionLog:
    """Index a frame with columns user_id, item_id (str), ts (int64), rating (float) by
    the catalog's item ids, and sort it by (user, ts). Items missing from the catalog must
    have been dropped or added by the caller."""
    item_index = pd.Index(item_ids)
    item = item_index.get_indexer(frame["item_id"])
    if (item < 0).any():
        missing = frame["item_id"][item < 0].iloc[0]
        raise ValueError(f"item_id {missing!r} is not in the item catalog")
    user_codes, user_ids = pd.factorize(frame["user_id"], sort=True)
    order = np.lexsort((frame["ts"].to_numpy(), user_codes))
    return InteractionLog(
        user=user_codes[order].astype(np.int32),
        item=item[order].astype(np.int32),
        ts=frame["ts"].to_numpy(dtype=np.int64)[order],
        rating=frame["rating"].to_numpy(dtype=np.float32)[order],
        user_ids=np.asarray(user_ids, dtype=object).astype(str),
    )
