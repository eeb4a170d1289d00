"""Choosing retrieval on validation, inside each training run: the popularity order, EASE's
λ, how much of a user's history seeds each neighbour source, then how the candidate budget
is shared between co-occurrence, EASE and popularity.

Both are chosen by candidate recall (the share of a user's label items among their
candidates, averaged over users) on the latest label window, through the code that serves:
the sparse EASE index of `top_neighbours` and `candidates_by_source`. λ is searched as a
multiple of the mean of diag(XᵀX), so the grid means the same on any data set; every λ of
the grid comes from one eigendecomposition (models.core.retrieval.ease_weights_path).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models.core.candidates import (
    NeighbourScores,
    UserScores,
    cooc_scores,
    ease_history,
    ease_scores,
    recent_items,
    take_by_source,
)
from models.core.interactions import ItemCatalog
from models.core.params import CandidateParams
from models.core.retrieval import (
    GramEigen,
    binary_rows,
    ease_items,
    ease_weights_path,
    top_neighbours,
)
from models.core.tables import ServingTables, build_tables, popularity
from training.groups import label_items
from training.split import Window

log = logging.getLogger("training")


@dataclass(frozen=True)
class RetrievalSearch:
    """What is searched. λ is relative (× mean diag(XᵀX)), on a grid a factor 2 apart that
    is extended past whichever end is best (by `max_extensions` at most), so the optimum is
    bracketed on any data. The budget is shared in steps of `budget_steps` with every
    source at least one step, so each source keeps examples in the ranker's training rows."""

    l2_grid: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    max_extensions: int = 6
    budget_steps: int = 8
    # Users measured, drawn with the run's seed: a recall over n users has a standard error
    # of at most 0.5/sqrt(n), 0.011 at 2,000, well below the differences chosen between.
    max_users: int = 2000
    # The popularity order: the weight of recent over all-time counts, and where "recent"
    # starts (a time quantile of the history), chosen first by the recall of that list alone.
    pop_trends: tuple[float, ...] = (0.0, 0.5, 1.0)
    recent_quantiles: tuple[float, ...] = (0.8, 0.9, 0.95)
    # How much of a user's history seeds co-occurrence (recent_items), how fast older items
    # weigh less there (recency_decay) and how much of it EASE sums over (ease_history):
    # chosen after λ, together, by the recall of the three sources sharing the budget
    # evenly. A short window suits data whose next items follow the last ones, a long one
    # data where taste lasts (synthetic, 5 seeds: NDCG@10 0.2456 at 20, 0.2532 at 50 for
    # both sources). The longest windows bound the serving cost: the gathered neighbour
    # entries per request grow with them. The decay is not searched by default: it shapes
    # the co-occurrence features as much as the candidates, which recall does not see
    # (chosen by recall, a decay of 1 left MovieLens-small's candidate recall as it was and
    # cost the ranker 0.014 NDCG@10 over 5 seeds).
    recent_items: tuple[int, ...] = (20, 50)
    recency_decays: tuple[float, ...] = (0.85,)
    ease_histories: tuple[int, ...] = (20, 50, 500)

    def __post_init__(self) -> None:
        if not self.l2_grid or min(self.l2_grid) <= 0:
            raise ValueError(f"RetrievalSearch.l2_grid must be non-empty and > 0, got {self.l2_grid}")
        if not self.recent_items or not self.ease_histories or min(self.recent_items + self.ease_histories) < 1 \
                or not self.recency_decays or not all(0 < d <= 1 for d in self.recency_decays):  # fmt: skip
            raise ValueError(f"RetrievalSearch.recent_items and ease_histories must be non-empty and >= 1, "
                             f"recency_decays non-empty and in (0, 1], got {self.recent_items}, "
                             f"{self.ease_histories} and {self.recency_decays}")  # fmt: skip
        if self.budget_steps < 3 or self.max_users < 1:
            raise ValueError(
                f"RetrievalSearch.budget_steps must be >= 3 (one step per source) and max_users >= 1, "
                f"got {self.budget_steps} and {self.max_users}"
            )


@dataclass(frozen=True)
class RetrievalSelection:
    params: CandidateParams  # the input parameters with the chosen ease_l2 and mix
    curve: dict[str, Any]  # what was measured, JSON-ready (model metadata)
    # The window's tables it measured on (no EASE index), whose co-occurrence index the
    # window's own tables can take: the choice leaves cooc_window and cooc_neighbors as given.
    tables: ServingTables | None = None


@dataclass(frozen=True)
class _User:
    """One label user of the recall: who, what they have, what they did next."""

    user: int
    seen: np.ndarray
    labels: np.ndarray


def mix_grid(budget: int, steps: int) -> list[tuple[int, int, int]]:
    """Every (n_cooc, n_ease, n_pop) summing to `budget` in steps of budget/steps (the last
    step absorbs the rounding), each at least one step."""
    if budget < steps:
        raise ValueError(f"candidate budget n_cooc + n_ease + n_pop = {budget} must be >= budget_steps = {steps}")
    step = budget // steps
    out = []
    for a in range(1, steps - 1):
        for b in range(1, steps - a):
            n_cooc, n_ease = a * step, b * step
            out.append((n_cooc, n_ease, budget - n_cooc - n_ease))
    return out


def choose_retrieval(
    win: Window, catalog: ItemCatalog, genre_names: list[str], params: CandidateParams,
    seed: int, search: RetrievalSearch = RetrievalSearch(),
) -> RetrievalSelection:
    """λ by the recall of EASE's own top-(whole budget) list, the recency by the recall of
    the three sources sharing the budget evenly, then the mix by the recall of the three
    together, on window `win`'s label users. The budget is today's total n_cooc + n_ease +
    n_pop of `params`; everything else in `params` is kept."""
    start = time.perf_counter()
    budget = params.n_cooc + params.n_ease + params.n_pop
    if len(win.label_users) == 0:
        return RetrievalSelection(params, {"skipped": "no labelled users in the window", "window": win.index})
    rng = np.random.default_rng(seed)
    rows = np.arange(len(win.label_users))
    if len(rows) > search.max_users:
        rows = np.sort(rng.choice(rows, search.max_users, replace=False))
    params, pop_rows = _choose_popularity(win, rows, catalog.n_items, params, budget, search)
    # Tables without EASE (a one-item model costs nothing): its index is swapped in per λ.
    tables = build_tables(win.history, catalog, genre_names, replace(params, ease_max_items=1),
                          user_history=win.user_history)  # fmt: skip
    users = [_User(int(win.label_users[j]), tables.history(int(win.label_users[j])), label_items(win, j))
             for j in rows.tolist()]  # fmt: skip
    cooc = _cooc(tables, users, params)

    items = ease_items(win.history, catalog.n_items, params.ease_max_items)
    x = binary_rows(win.history, items)
    mean_diag = x.mean_diagonal()
    eigen = GramEigen.of_rows(x)
    lambda_rows: list[dict[str, float]] = []
    best: tuple[float, float, ServingTables, list[NeighbourScores]] | None = None

    def measure(multiples: list[float]) -> None:
        nonlocal best
        lambdas = [m * mean_diag for m in multiples]
        for m, lam, b in zip(multiples, lambdas, ease_weights_path(eigen, lambdas)):
            indptr, neighbours, weights = top_neighbours(b, items, catalog.n_items, params.ease_neighbors)
            del b  # one n × n matrix alive at a time
            candidate_tables = replace(tables, ease_indptr=indptr, ease_items=neighbours, ease_weights=weights)
            ease = _ease(candidate_tables, users, params)
            recall = _mix_recall(candidate_tables, users, cooc, ease, (0, budget, 0))
            lambda_rows.append({"ease_l2": m, "lambda": lam, "ease_recall": recall})
            log.info("EASE λ = %g × %.2f: candidate recall of its top %d %.4f", m, mean_diag, budget, recall)
            if best is None or recall > best[1]:
                best = (m, recall, candidate_tables, ease)

    grid = sorted(search.l2_grid)
    measure(grid)
    low, high = grid[0], grid[-1]
    for _ in range(search.max_extensions):
        assert best is not None  # the grid is not empty
        if best[0] == high and len(grid) > 1:
            high *= 2
            measure([high])
        elif best[0] == low and len(grid) > 1:
            low /= 2
            measure([low])
        else:
            break
    assert best is not None
    chosen_l2, _, chosen_tables, given_ease = best
    lambda_rows.sort(key=lambda row: row["ease_l2"])

    given_cooc = cooc  # under the given recency, for "today's two sources"
    # Each source's scores once per window of its own (the given ones are measured already),
    # then the recall of every combination.
    coocs = {(n, d): cooc if (n, d) == (params.recent_items, params.recency_decay)
             else _cooc(chosen_tables, users, replace(params, recent_items=n, recency_decay=d))
             for n in search.recent_items for d in search.recency_decays}  # fmt: skip
    eases = {n: given_ease if n == params.ease_history else _ease(chosen_tables, users, replace(params, ease_history=n))
             for n in search.ease_histories}  # fmt: skip
    even = (budget // 3, budget // 3, budget - 2 * (budget // 3))
    recency_rows: list[dict[str, float]] = []
    best_recency: tuple[float, CandidateParams] | None = None
    for (n_recent, decay), n_ease_history in itertools.product(coocs, eases):
        recall = _mix_recall(chosen_tables, users, coocs[n_recent, decay], eases[n_ease_history], even)
        recency_rows.append({"recent_items": n_recent, "recency_decay": decay,
                             "ease_history": n_ease_history, "recall": recall})  # fmt: skip
        if best_recency is None or recall > best_recency[0]:
            trial = replace(params, recent_items=n_recent, recency_decay=decay, ease_history=n_ease_history)
            best_recency = (recall, trial)
    assert best_recency is not None  # the grids are not empty
    params = best_recency[1]
    cooc, ease = coocs[params.recent_items, params.recency_decay], eases[params.ease_history]
    log.info("recency: co-occurrence from the last %d items, decay %g, EASE from the last %d: candidate recall "
             "%.4f (budget shared evenly)", params.recent_items, params.recency_decay, params.ease_history,
             best_recency[0])  # fmt: skip

    mix_rows: list[dict[str, float]] = []
    best_mix: tuple[tuple[int, int, int], float] | None = None
    for mix in mix_grid(budget, search.budget_steps):
        recall = _mix_recall(chosen_tables, users, cooc, ease, mix)
        mix_rows.append({"n_cooc": mix[0], "n_ease": mix[1], "n_pop": mix[2], "recall": recall})
        if best_mix is None or recall > best_mix[1]:
            best_mix = (mix, recall)
    assert best_mix is not None  # budget_steps >= 3 gives at least one mix
    (n_cooc, n_ease, n_pop), mix_recall = best_mix
    chosen = replace(params, ease_l2=chosen_l2, n_cooc=n_cooc, n_ease=n_ease, n_pop=n_pop)
    # Today's two sources: co-occurrence and popularity sharing the budget 3:1 (150/50), from
    # the given recency.
    without_ease = (budget * 3 // 4, 0, budget - budget * 3 // 4)
    baseline = _mix_recall(chosen_tables, users, given_cooc, ease, without_ease)
    seconds = time.perf_counter() - start
    log.info("retrieval: EASE λ = %g × mean diag, mix %d/%d/%d (cooc/ease/pop): candidate recall %.4f "
             "(%d/%d without EASE: %.4f) on %d users of window %d, %.1f s", chosen_l2, n_cooc, n_ease,
             n_pop, mix_recall, without_ease[0], without_ease[2], baseline, len(users), win.index, seconds)  # fmt: skip
    curve = {
        "window": win.index,
        "users": len(users),
        "budget": budget,
        "ease_items": len(items),
        "mean_diag": mean_diag,
        "popularity": pop_rows,
        "lambda": lambda_rows,
        "recency": recency_rows,
        "mix": mix_rows,
        "chosen": {"pop_trend": params.pop_trend, "recent_quantile": params.recent_quantile, "ease_l2": chosen_l2,
                   "recent_items": params.recent_items, "recency_decay": params.recency_decay,
                   "ease_history": params.ease_history,
                   "n_cooc": n_cooc, "n_ease": n_ease, "n_pop": n_pop, "recall": mix_recall},
        "recall_without_ease": {"n_cooc": without_ease[0], "n_pop": without_ease[2], "recall": baseline},
        "seconds": round(seconds, 3),
    }
    return RetrievalSelection(chosen, curve, tables)


def _cooc(tables: ServingTables, users: list[_User], params: CandidateParams) -> list[NeighbourScores]:
    """Each user's co-occurrence scores under `params`' recency."""
    return [cooc_scores(tables, recent_items(tables, u.user, params), params) for u in users]


def _ease(tables: ServingTables, users: list[_User], params: CandidateParams) -> list[NeighbourScores]:
    """Each user's EASE scores over their last `params.ease_history` items."""
    return [ease_scores(tables, ease_history(tables, u.user, params)) for u in users]


def _choose_popularity(
    win: Window, rows: np.ndarray, n_items: int, params: CandidateParams, budget: int, search: RetrievalSearch
) -> tuple[CandidateParams, list[dict[str, float]]]:
    """The (pop_trend, recent_quantile) whose popularity list alone, `budget` long and
    without seen items, recalls most of the label items of the users `rows`."""
    seen_by = win.user_history
    starts = np.searchsorted(seen_by.user, win.label_users[rows])
    ends = np.searchsorted(seen_by.user, win.label_users[rows], side="right")
    taken = np.zeros(n_items, dtype=bool)
    measured: list[dict[str, float]] = []
    best: tuple[float, CandidateParams] | None = None
    for trend in search.pop_trends:
        for quantile in search.recent_quantiles:
            trial = replace(params, pop_trend=trend, recent_quantile=quantile)
            order = popularity(win.history, n_items, trial)[2]
            recalls = np.empty(len(rows))
            for r, j in enumerate(rows.tolist()):
                seen = seen_by.item[starts[r] : ends[r]]
                head = order[: budget + len(seen)]
                taken[seen] = True
                listed = np.zeros(n_items, dtype=bool)
                listed[head[~taken[head]][:budget]] = True
                recalls[r] = listed[label_items(win, j)].mean()
                taken[seen] = False
            recall = float(recalls.mean()) if len(recalls) else 0.0
            measured.append({"pop_trend": trend, "recent_quantile": quantile, "recall": recall})
            if best is None or recall > best[0]:
                best = (recall, trial)
    assert best is not None, "RetrievalSearch has no popularity grid"
    log.info("popularity order: pop_trend %g, recent_quantile %g: recall of its top %d %.4f",
             best[1].pop_trend, best[1].recent_quantile, budget, best[0])  # fmt: skip
    return best[1], measured


def _mix_recall(
    tables: ServingTables, users: list[_User], cooc: list[NeighbourScores], ease: list[NeighbourScores],
    mix: tuple[int, int, int],
) -> float:
    """Mean recall of the candidates `candidates_by_source` gives for the mix (n_cooc,
    n_ease, n_pop), from each user's neighbour scores computed once."""
    taken = np.zeros(tables.n_items, dtype=bool)
    is_candidate = np.zeros(tables.n_items, dtype=bool)  # masks, not membership tests: ~5x faster
    recalls = np.empty(len(users))
    for j, (u, c, e) in enumerate(zip(users, cooc, ease)):
        taken[u.seen] = True
        candidates = np.concatenate(take_by_source(tables, UserScores(c, e), mix, taken))
        is_candidate[candidates] = True
        recalls[j] = is_candidate[u.labels].mean()
        taken[u.seen] = taken[candidates] = is_candidate[candidates] = False
    return float(recalls.mean())
