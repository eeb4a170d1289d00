"""Candidate generation: item-to-item co-occurrence from the user's last items, plus
popularity; merged, de-duplicated and (by default) without the items the user already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.core.params import CandidateParams
from models.core.tables import ServingTables

# Where a candidate came from (the API shows it per recommended item).
CandidateSource = Literal["cooccurrence", "popularity"]
COOCCURRENCE: CandidateSource = "cooccurrence"
POPULARITY: CandidateSource = "popularity"

_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True)
class CoocScores:
    """Co-occurrence of items with a user's recent items; `items` is sorted ascending."""

    items: np.ndarray  # int32, unique, ascending
    score: np.ndarray  # recency-weighted sum
    best: np.ndarray  # max over the recent items
    last: np.ndarray  # with the most recent item only
    rank: np.ndarray  # 0 = highest score
    order: np.ndarray  # positions in `items`, highest score first (ties: lower item first)

    @classmethod
    def empty(cls) -> CoocScores:
        return cls(_EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_F, _EMPTY_I, _EMPTY_I)

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position of each item in `self.items`, and whether it is there at all."""
        pos = np.searchsorted(self.items, items)
        pos = np.minimum(pos, max(len(self.items) - 1, 0))
        found = (self.items[pos] == items) if len(self.items) else np.zeros(len(items), bool)
        return pos, found


def recent_items(tables: ServingTables, user: int | None, params: CandidateParams) -> np.ndarray:
    """The user's last `recent_items` items, most recent first (empty for unknown users)."""
    if user is None:
        return _EMPTY_I
    return tables.history(user)[-params.recent_items :][::-1]


def cooc_scores(tables: ServingTables, recent: np.ndarray, params: CandidateParams) -> CoocScores:
    """Aggregate the co-occurrence rows of `recent` (most recent first) per neighbour item."""
    if len(recent) == 0:
        return CoocScores.empty()
    starts = tables.cooc_indptr[recent]
    lengths = tables.cooc_indptr[recent + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return CoocScores.empty()
    # Gather every neighbour slice at once: offsets of each slice repeated over its length.
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    idx = offsets + np.arange(total)
    neighbours = tables.cooc_items[idx]
    sims = tables.cooc_scores[idx].astype(np.float64)
    position = np.repeat(np.arange(len(recent)), lengths)
    weights = params.recency_decay**position
    items, inverse = np.unique(neighbours, return_inverse=True)
    score = np.bincount(inverse, weights=sims * weights, minlength=len(items))
    best = np.zeros(len(items))
    np.maximum.at(best, inverse, sims)
    last = np.bincount(inverse, weights=sims * (position == 0), minlength=len(items))
    order = np.lexsort((items, -score))
    rank = np.empty(len(items), dtype=np.int32)
    rank[order] = np.arange(len(items), dtype=np.int32)
    return CoocScores(items.astype(np.int32), score, best, last, rank, order)


def _without(values: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """`values` not in `excluded`. Item ids are dense indices, so numpy's lookup-table
    membership test is ~3x faster here than its sorting one."""
    if len(excluded) == 0 or len(values) == 0:
        return values
    return values[~np.isin(values, excluded, kind="table")]


def candidates_by_source(
    tables: ServingTables,
    user: int | None,
    params: CandidateParams,
    exclude_seen: bool = True,
) -> tuple[np.ndarray, np.ndarray, CoocScores]:
    """Up to n_cooc co-occurrence candidates (best first) and up to n_pop popular items not
    among them; items the user has are left out when `exclude_seen`."""
    cooc = cooc_scores(tables, recent_items(tables, user, params), params)
    seen = tables.history(user) if (exclude_seen and user is not None) else _EMPTY_I
    from_cooc = _without(cooc.items[cooc.order], seen)[: params.n_cooc]
    # Enough popular items that n_pop survive removing seen and already chosen ones.
    head = tables.pop_order[: params.n_pop + len(from_cooc) + len(seen)]
    from_pop = _without(_without(head, from_cooc), seen)[: params.n_pop]
    return from_cooc.astype(np.int32), from_pop.astype(np.int32), cooc


def generate_candidates(
    tables: ServingTables,
    user: int | None,
    params: CandidateParams,
    exclude_seen: bool = True,
) -> tuple[np.ndarray, CoocScores]:
    """The candidates of `candidates_by_source` in one list: co-occurrence first, then
    popularity, de-duplicated."""
    from_cooc, from_pop, cooc = candidates_by_source(tables, user, params, exclude_seen)
    return np.concatenate((from_cooc, from_pop)).astype(np.int32), cooc
