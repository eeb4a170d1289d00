"""Serving tables: everything candidate generation and feature building read, built from a
history of interactions, and saved in open formats (Parquet, NPZ) inside a model version.

Training builds one set per time window (so features only see the past of the labels they
are paired with); the saved set is built from all interactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.core.interactions import InteractionLog, ItemCatalog
from models.core.params import CandidateParams
from models.core.retrieval import build_ease_index
from models.core.schema import ITEM_FEATURES, USER_FEATURES

ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
ARRAYS_FILE = "arrays.npz"
UNKNOWN_YEAR = -1.0


@dataclass(frozen=True)
class ServingTables:
    """Item and user tables, user histories, the co-occurrence index and the sparse EASE
    weights, all dense-indexed."""

    item_ids: np.ndarray  # str (I,)
    titles: np.ndarray  # str (I,)
    genres: np.ndarray  # str (I,)
    item_feats: np.ndarray  # float32 (I, len(ITEM_FEATURES))
    item_genre: np.ndarray  # float32 (I, G), unit rows
    pop_order: np.ndarray  # int32 (I,): items by popularity, most popular first
    pop_rank: np.ndarray  # int32 (I,): position of each item in pop_order
    user_ids: np.ndarray  # str (U,)
    user_feats: np.ndarray  # float32 (U, len(USER_FEATURES))
    user_genre: np.ndarray  # float32 (U, G), unit rows
    hist_indptr: np.ndarray  # int64 (U+1,): CSR of each user's items in time order
    hist_items: np.ndarray  # int32
    cooc_indptr: np.ndarray  # int64 (I+1,): CSR of each item's neighbours, best first
    cooc_items: np.ndarray  # int32
    cooc_scores: np.ndarray  # float32
    ease_indptr: np.ndarray  # int64 (I+1,): CSR of each item's EASE weights, best first
    ease_items: np.ndarray  # int32: the items each row's weights go to
    ease_weights: np.ndarray  # float32, > 0

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def history(self, user: int) -> np.ndarray:
        """The user's items, oldest first."""
        return self.hist_items[self.hist_indptr[user] : self.hist_indptr[user + 1]]

    def nbytes(self) -> int:
        return sum(
            v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray) and v.dtype != object
        )

    # -- persistence ---------------------------------------------------------------------

    def save(self, folder: str | Path) -> list[str]:
        """Write the tables into `folder`; returns the file names written."""
        folder = Path(folder)
        items = pd.DataFrame(
            {"item_id": self.item_ids, "title": self.titles, "genres": self.genres}
        )
        for j, name in enumerate(ITEM_FEATURES):
            items[name] = self.item_feats[:, j]
        items["pop_rank"] = self.pop_rank
        items.to_parquet(folder / ITEMS_FILE, index=False)
        users = pd.DataFrame({"user_id": self.user_ids})
        for j, name in enumerate(USER_FEATURES):
            users[name] = self.user_feats[:, j]
        users.to_parquet(folder / USERS_FILE, index=False)
        np.savez(
            folder / ARRAYS_FILE,
            item_genre=self.item_genre,
            user_genre=self.user_genre,
            hist_indptr=self.hist_indptr,
            hist_items=self.hist_items,
            cooc_indptr=self.cooc_indptr,
            cooc_items=self.cooc_items,
            cooc_scores=self.cooc_scores,
            ease_indptr=self.ease_indptr,
            ease_items=self.ease_items,
            ease_weights=self.ease_weights,
        )
        return [ITEMS_FILE, USERS_FILE, ARRAYS_FILE]

    @classmethod
    def load(cls, folder: str | Path) -> ServingTables:
        folder = Path(folder)
        items = pd.read_parquet(folder / ITEMS_FILE)
        users = pd.read_parquet(folder / USERS_FILE)
        # allow_pickle=False: a model folder must never make us unpickle anything.
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as arrays:
            a = {k: arrays[k] for k in arrays.files}
        pop_rank = items["pop_rank"].to_numpy(dtype=np.int32)
        return cls(
            item_ids=items["item_id"].to_numpy(dtype=str),
            titles=items["title"].to_numpy(dtype=str),
            genres=items["genres"].to_numpy(dtype=str),
            item_feats=items[list(ITEM_FEATURES)].to_numpy(dtype=np.float32),
            item_genre=a["item_genre"],
            pop_order=np.argsort(pop_rank).astype(np.int32),
            pop_rank=pop_rank,
            user_ids=users["user_id"].to_numpy(dtype=str),
            user_feats=users[list(USER_FEATURES)].to_numpy(dtype=np.float32),
            user_genre=a["user_genre"],
            hist_indptr=a["hist_indptr"],
            hist_items=a["hist_items"],
            cooc_indptr=a["cooc_indptr"],
            cooc_items=a["cooc_items"],
            cooc_scores=a["cooc_scores"],
            ease_indptr=a["ease_indptr"],
            ease_items=a["ease_items"],
            ease_weights=a["ease_weights"],
        )


def _per_user_mean(user: np.ndarray, values: np.ndarray, n_users: int, default: float) -> np.ndarray:
    weight = np.bincount(user, minlength=n_users).astype(np.float64)
    total = np.bincount(user, weights=values, minlength=n_users)
    return np.where(weight > 0, total / np.maximum(weight, 1), default)


# Pair entries aggregated at once when the co-occurrence index is built: source items are
# processed in blocks of about this many entries, so the temporaries (int64 keys, float64
# weights and the sort) stay near 40 bytes × this, whatever the size of the log.
COOC_BLOCK_ENTRIES = 16_000_000


def build_cooc_index(
    history: InteractionLog, n_items: int, params: CandidateParams, block_entries: int = COOC_BLOCK_ENTRIES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-to-item co-occurrence within `cooc_window` steps of each user's timeline,
    weighted 1/distance, cosine-normalised by item counts; the best `cooc_neighbors` per item,
    as a CSR (indptr int64, neighbours int32, scores float32), each row best first (ties:
    lower neighbour first). Built block by block of source items (about `block_entries`
    pair entries at a time), each block's rows cut to their best neighbours before the next,
    so memory follows the block, not the log. A block reads only its own items' positions in
    the log (one argsort by item), so the build is O(window × log), not O(blocks × window ×
    log): 194 -> 48 s on ml-25m's 20M-interaction window 1."""
    from scipy import sparse  # training only: serving imports this module, never this function

    user, item = history.user, history.item
    window = min(params.cooc_window, max(len(user) - 1, 0))
    item_count = np.bincount(item, minlength=n_items).astype(np.float64)
    empty = (np.zeros(n_items + 1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    if window == 0 or n_items == 0:
        return empty
    # Entries per source item are at most 2 × window × its count: blocks cut on that bound.
    bound = np.cumsum(2 * window * item_count)
    n_blocks = max(1, int(np.ceil(bound[-1] / block_entries)))
    edges = np.unique(np.r_[0, np.searchsorted(bound, np.arange(1, n_blocks) * block_entries), n_items])
    by_item = np.argsort(item, kind="stable")
    item_starts = np.r_[0, np.cumsum(item_count.astype(np.int64))]
    # Padded with `window` rows of user -1 at each end: every offset is inside, no bounds tests.
    user_pad = np.concatenate((np.full(window, -1, user.dtype), user, np.full(window, -1, user.dtype)))
    item_pad = np.concatenate((np.full(window, -1, item.dtype), item, np.full(window, -1, item.dtype)))
    steps = np.r_[np.arange(1, window + 1), -np.arange(1, window + 1)]
    step_weight = 1.0 / np.abs(steps)
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    dsts: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        at = by_item[item_starts[lo] : item_starts[hi]] + window  # this block's log positions, padded
        # item[at] - lo, known from the sort: no gather
        src = np.repeat(np.arange(hi - lo, dtype=np.int64), item_count[lo:hi].astype(np.int64))
        # One row per position, one column per step: src stays ascending when flattened.
        other = at[:, None] + steps[None, :]
        dst = item_pad[other]
        pair = (user_pad[other] == user_pad[at][:, None]) & (dst != (src + lo)[:, None])
        row_len = np.bincount(np.broadcast_to(src[:, None], pair.shape)[pair], minlength=hi - lo)
        counts = sparse.csr_matrix(
            (np.broadcast_to(step_weight, pair.shape)[pair], dst[pair], np.r_[0, np.cumsum(row_len)]),
            shape=(hi - lo, n_items),
        )
        del other, dst, pair
        counts.sum_duplicates()  # each row's neighbours once, ascending
        row = np.repeat(np.arange(hi - lo), np.diff(counts.indptr))
        neighbour, weight, row_starts = counts.indices, counts.data, counts.indptr
        score = weight / np.sqrt(np.maximum(item_count[row + lo], 1) * np.maximum(item_count[neighbour], 1))
        score = score.astype(np.float32)  # as saved: the order below is exact for these values
        # Each row best first, ties by lower neighbour (the columns are ascending and the sort
        # stable): one sort of (row, score) packed in a uint64, as a positive float32's bits
        # order like its value (lexsort of (-score, row) took 5-10x as long).
        key = (row.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - score.view(np.uint32))
        order = np.argsort(key, kind="stable")
        row, neighbour, score = row[order], neighbour[order], score[order]
        keep = np.arange(len(row)) - row_starts[row] < params.cooc_neighbors
        indptr[lo + 1 : hi + 1] = np.minimum(np.diff(row_starts), params.cooc_neighbors)
        dsts.append(neighbour[keep].astype(np.int32))
        scores.append(score[keep])
    if not dsts:
        return empty
    return np.cumsum(indptr), np.concatenate(dsts), np.concatenate(scores)


def popularity(
    history: InteractionLog, n_items: int, params: CandidateParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All-time and recent counts per item, the popularity order (most popular first, by
    params.pop_trend) and each item's position in it."""
    count = np.bincount(history.item, minlength=n_items).astype(np.float64)
    if len(history):
        cutoff = np.quantile(history.ts, params.recent_quantile)
        recent = np.bincount(history.item[history.ts >= cutoff], minlength=n_items).astype(np.float64)
    else:
        recent = np.zeros(n_items)
    key = (1.0 - params.pop_trend) * np.log1p(count) + params.pop_trend * np.log1p(recent)
    # Ties are broken by all-time popularity, then by index, so the order is stable.
    pop_order = np.lexsort((np.arange(n_items), -count, -key)).astype(np.int32)
    pop_rank = np.empty(n_items, dtype=np.int32)
    pop_rank[pop_order] = np.arange(n_items, dtype=np.int32)
    return count, recent, pop_order, pop_rank


def user_profiles(
    user: np.ndarray, item: np.ndarray, n_users: int, item_log_pop: np.ndarray, item_year: np.ndarray,
    item_genre: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the user features (USER_FEATURES order, float32 (n_users, 3)) and the unit
    genre profile (float32 (n_users, G)) of the interactions (user[j], item[j]), for the
    tables training builds; serving computes one user's with `one_user_profile`, the same
    arithmetic (tests/unit/test_merged_history.py). `item_log_pop` and `item_year` are per
    catalog item."""
    user_count = np.bincount(user, minlength=n_users).astype(np.float64)
    years = item_year.astype(np.float64)
    known_year = years[item] >= 0
    user_year = _per_user_mean(user[known_year], years[item][known_year], n_users, UNKNOWN_YEAR)
    user_pop = _per_user_mean(user, item_log_pop.astype(np.float64)[item], n_users, 0.0)
    user_feats = np.column_stack([np.log1p(user_count), user_pop, user_year]).astype(np.float32)
    from scipy import sparse  # training only: serving imports this module, never this function

    # The sum of each user's item genre rows, as (users × items counts) @ item_genre: no
    # (rows, G) temporary of the whole log (np.add.at over 1M-row chunks: 7.4 s, this 1.2 s at 20M).
    counts = sparse.csr_matrix((np.ones(len(user), dtype=np.float32), (user, item)),
                               shape=(n_users, item_genre.shape[0]))  # fmt: skip
    user_genre = np.asarray(counts @ item_genre, dtype=np.float32)
    norms = np.linalg.norm(user_genre, axis=1, keepdims=True)
    user_genre = np.divide(user_genre, norms, out=np.zeros_like(user_genre), where=norms > 0)
    return user_feats, user_genre


def one_user_profile(
    items: np.ndarray, item_log_pop: np.ndarray, item_year: np.ndarray, item_genre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """user_profiles of a single user's interactions `items` (its rows 0): serving's merged
    history, on every /recommend with online items. The same arithmetic without the per-user
    scatter (np.add.at and bincounts: serving's user_profile took 121 µs a call with it, 48
    without, on MovieLens-small)."""
    years = item_year[items].astype(np.float64)
    known = years[years >= 0]
    user_year = float(known.sum() / len(known)) if len(known) else UNKNOWN_YEAR
    user_pop = float(item_log_pop[items].astype(np.float64).sum() / len(items)) if len(items) else 0.0
    feats = np.array([np.log1p(float(len(items))), user_pop, user_year], dtype=np.float32)
    genre = item_genre[items].sum(axis=0, dtype=np.float32)
    norm = np.linalg.norm(genre)
    return feats, (genre / norm if norm > 0 else np.zeros_like(genre))


def build_tables(
    history: InteractionLog, catalog: ItemCatalog, genre_names: list[str], params: CandidateParams,
    user_history: InteractionLog | None = None, cooc_from: ServingTables | None = None,
) -> ServingTables:
    """Build every serving table from the past of what is predicted: item-side tables
    (popularity, co-occurrence, item features) from `history`, user-side ones (histories,
    user features) from `user_history` (default: the same log), which may add each user's own
    recent interactions. `cooc_from`: tables built from the same `history` with the same
    cooc_window and cooc_neighbors, whose co-occurrence index is taken as it is (the
    costliest table: 48 s at ml-25m's size)."""
    users_log = history if user_history is None else user_history
    n_items, n_users = catalog.n_items, users_log.n_users
    item = history.item

    count, recent, pop_order, pop_rank = popularity(history, n_items, params)
    rated = ~np.isnan(history.rating)
    rating_sum = np.bincount(item[rated], weights=history.rating[rated], minlength=n_items)
    rating_n = np.bincount(item[rated], minlength=n_items)
    mean_rating = np.where(rating_n > 0, rating_sum / np.maximum(rating_n, 1), 0.0)
    years = catalog.years.astype(np.float64)
    item_feats = np.column_stack([np.log1p(count), np.log1p(recent), years, mean_rating])

    user, item = users_log.user, users_log.item
    user_count = np.bincount(user, minlength=n_users).astype(np.float64)
    item_genre = catalog.genre_matrix(genre_names)
    user_feats, user_genre = user_profiles(user, item, n_users, np.log1p(count), years, item_genre)

    hist_indptr = np.concatenate(([0], np.cumsum(user_count.astype(np.int64)))).astype(np.int64)
    if cooc_from is None:
        cooc_indptr, cooc_items, cooc_scores = build_cooc_index(history, n_items, params)
    else:
        cooc_indptr, cooc_items, cooc_scores = (cooc_from.cooc_indptr, cooc_from.cooc_items,
                                                cooc_from.cooc_scores)  # fmt: skip
    ease_indptr, ease_items, ease_weights = build_ease_index(history, n_items, params)
    return ServingTables(
        item_ids=catalog.item_ids,
        titles=catalog.titles,
        genres=catalog.genres,
        item_feats=item_feats.astype(np.float32),
        item_genre=item_genre,
        pop_order=pop_order,
        pop_rank=pop_rank,
        user_ids=users_log.user_ids,
        user_feats=user_feats,
        user_genre=user_genre,
        hist_indptr=hist_indptr,
        hist_items=item.astype(np.int32),
        cooc_indptr=cooc_indptr,
        cooc_items=cooc_items,
        cooc_scores=cooc_scores,
        ease_indptr=ease_indptr,
        ease_items=ease_items,
        ease_weights=ease_weights,
    )
