"""Lean training rows, chosen on validation inside each run.

Not every candidate of every labelled user is needed to learn a ranking. A group keeps every
positive, its first `hard` negatives in candidate order (the top of co-occurrence, then EASE,
then popularity: the negatives the ranker must push down) and `random` negatives drawn from
the rest (so it still sees the bottom of the list). Which `(hard, random)`, and how many
groups, is measured on the validation groups (always full: they stand for the served
ranking of every candidate):

1. *Sampling*: on a pilot of training groups, the base ranker is fitted on each sampling of a
   grid relative to k and on the full groups; the sampling with the fewest rows whose
   validation NDCG is not below the best by more than `z` paired standard errors is chosen.
2. *Groups*: with that sampling, the training groups are doubled (a seeded random order over
   every (window, user) of the label windows) while the doubling raises validation NDCG by
   more than `z` paired standard errors; the run stops adding groups when more data is
   free of gain, and uses what it has.

No rate is fixed for one data set: the grid is in multiples of k, the stopping rule is a
paired test over the validation groups, and both curves go into the version's metadata.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.core.params import CandidateParams
from models.core.tables import ServingTables
from training.groups import Groups, labelled_groups
from training.ranker import Fitted, RankerParams, RankingData, fit_booster
from training.split import Window

log = logging.getLogger("training")


@dataclass(frozen=True)
class RowSampling:
    """Which candidates of a group become training rows: every positive, the first `hard`
    negatives in candidate order and `random` of the other negatives. hard None: all."""

    hard: int | None = None
    random: int = 0

    def __post_init__(self) -> None:
        if (self.hard is not None and self.hard < 0) or self.random < 0:
            raise ValueError(f"RowSampling hard and random must be >= 0, got {self.hard} and {self.random}")

    @property
    def full(self) -> bool:
        return self.hard is None

    def select(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Positions of the kept rows of one group (labels `y` in candidate order), ascending."""
        if self.hard is None:
            return np.arange(len(y))
        negatives = np.flatnonzero(y == 0)
        rest = negatives[self.hard :]
        drawn = rng.choice(rest, size=min(self.random, len(rest)), replace=False) if len(rest) else rest
        return np.sort(np.concatenate((np.flatnonzero(y > 0), negatives[: self.hard], drawn)))

    def describe(self) -> str:
        return "all candidates" if self.hard is None else f"positives + {self.hard} hard + {self.random} random"


def sampling_grid(k: int) -> list[RowSampling]:
    """The samplings tried, relative to k (the ranking is judged on its top k): uniform
    negatives (2k, 4k, 8k), and k hard ones with 4k or 8k uniform. Hard negatives alone
    are not in it: the features say where a candidate sits in the list, and keeping the
    top negatives and few others teaches the ranker that a high list position means a
    negative (on the synthetic default, 10 hard + 10 random scored validation NDCG@10
    0.137 against 0.277 with every candidate)."""
    return [RowSampling(0, 2 * k), RowSampling(0, 4 * k), RowSampling(0, 8 * k), RowSampling(k, 4 * k),
            RowSampling(k, 8 * k)]


@dataclass(frozen=True)
class RowSearch:
    """How lean rows are chosen. `pilot_groups` training groups measure the sampling grid;
    the groups then double from there. `z`: the paired standard errors a gain must pass.
    `max_valid_groups` bounds the validation groups (early stopping and every comparison):
    the standard error of a mean NDCG over n groups is at most 0.5/sqrt(n), 0.008 at 4,000."""

    pilot_groups: int = 1000
    max_valid_groups: int = 4000
    z: float = 1.0
    # Below this many training rows with every candidate (labelled users × the candidate
    # budget), the search is skipped and every candidate of every user is used: such a fit
    # takes a minute or two on 2 cores, less than the search's own fits would.
    full_rows_budget: int = 1_000_000
    grid: Sequence[RowSampling] | None = None  # None: sampling_grid(k)

    def __post_init__(self) -> None:
        if self.pilot_groups < 10 or self.max_valid_groups < 2 or self.z < 0 or self.full_rows_budget < 0:
            raise ValueError(
                f"RowSearch needs pilot_groups >= 10, max_valid_groups >= 2, z >= 0, full_rows_budget >= 0; "
                f"got {self.pilot_groups}, {self.max_valid_groups}, {self.z}, {self.full_rows_budget}"
            )


@dataclass
class WindowSource:
    """A label window whose groups can be built on demand: its tables and which of its
    labelled users (positions j into win.label_users) are for validation."""

    tables: ServingTables
    win: Window
    valid: np.ndarray  # bool over win.label_users


@dataclass
class RowPlan:
    """What the search chose and measured (JSON-ready for the metadata)."""

    sampling: RowSampling
    groups: int
    rows: int
    available_pairs: int
    used_pairs: int
    sampling_curve: list[dict[str, Any]] = field(default_factory=list)
    groups_curve: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sampling": {"hard": self.sampling.hard if self.sampling.hard is not None else -1,
                         "random": self.sampling.random, "describe": self.sampling.describe()},
            "train_groups": self.groups, "train_rows": self.rows,
            "available_pairs": self.available_pairs, "used_pairs": self.used_pairs,
            "sampling_curve": self.sampling_curve, "groups_curve": self.groups_curve,
        }  # fmt: skip


def _pairs(sources: list[WindowSource], valid: bool) -> np.ndarray:
    """(window position, j) of every labelled user of every source, validation or training."""
    parts = [np.column_stack((np.full(int(m.sum()), s), np.flatnonzero(m)))
             for s, src in enumerate(sources) for m in [src.valid if valid else ~src.valid]]  # fmt: skip
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), dtype=np.int64)


def build_groups(
    sources: list[WindowSource], params: CandidateParams, pairs: np.ndarray, out: Groups,
    sampling: RowSampling, rng: np.random.Generator, shuffle: np.random.Generator | None = None,
) -> int:
    """Add the groups of `pairs` ((window position, j) rows) to `out`, sampled, with qids
    that continue `out`'s (ascending, as XGBoost needs). Returns the groups added."""
    added = 0
    for s in np.unique(pairs[:, 0]).tolist():
        src = sources[s]
        rows = np.sort(pairs[pairs[:, 0] == s, 1])
        for _, _, x, y in labelled_groups(src.tables, src.win, params, rows, shuffle):
            keep = sampling.select(y, rng)
            out.add(x[keep], y[keep], len(out))
            added += 1
    return added


def subsample(groups: Groups, sampling: RowSampling, rng: np.random.Generator) -> Groups:
    """The same groups, each cut down by `sampling` (groups must be full)."""
    out = Groups()
    for x, y in zip(groups.features, groups.labels):
        keep = sampling.select(y, rng)
        out.add(x[keep], y[keep], len(out))
    return out


# A fit of the base ranker on (train, valid) groups: the fit, and the validation NDCG@k of
# each valid group.
FitScore = Callable[[Groups, Groups], tuple[Fitted, np.ndarray]]


def base_fit_scorer(base: RankerParams, k: int, seed: int, nthread: int) -> FitScore:
    """A FitScore of the base ranker parameters (early stopping on the validation groups)."""

    def fit_score(train: Groups, valid: Groups) -> tuple[Fitted, np.ndarray]:
        start = time.perf_counter()
        data = RankingData(train, valid, nthread, base.max_bin)
        booster, curve, best_round = fit_booster(data, base, k, seed)
        fitted = Fitted(data, base, booster, curve, best_round, time.perf_counter() - start)
        return fitted, data.valid_group_ndcg(booster, k)

    return fit_score


def _gap(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of reference - other, paired over the validation groups."""
    diff = reference - other
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def choose_rows(
    sources: list[WindowSource], params: CandidateParams, k: int, seed: int, fit_score: FitScore,
    search: RowSearch = RowSearch(), shuffle: np.random.Generator | None = None,
) -> tuple[Groups, Groups, RowPlan, Fitted | None]:
    """(training groups, validation groups, the plan, the base ranker's fit on those groups
    when the groups grew past the pilot: the largest fit of the search, which tuning need
    not repeat) by the two steps of the module docstring. `fit_score` fits the base ranker
    and scores each validation group."""
    rng = np.random.default_rng([seed, 18])
    valid_pairs = _pairs(sources, valid=True)
    if len(valid_pairs) > search.max_valid_groups:
        valid_pairs = valid_pairs[rng.choice(len(valid_pairs), search.max_valid_groups, replace=False)]
    valid = Groups()
    build_groups(sources, params, valid_pairs, valid, RowSampling(), rng, shuffle)
    order = _pairs(sources, valid=False)
    order = order[rng.permutation(len(order))]
    used = min(search.pilot_groups, len(order))
    pilot = Groups()
    build_groups(sources, params, order[:used], pilot, RowSampling(), rng, shuffle)
    if len(pilot) < 10 or len(valid) < 2:
        return pilot, valid, RowPlan(RowSampling(), len(pilot), pilot.n_rows(), len(order), used), None

    # 1. The sampling, on the pilot.
    measured: list[tuple[RowSampling, Groups, np.ndarray]] = []
    for sampling in [RowSampling(), *(search.grid or sampling_grid(k))]:
        train = pilot if sampling.full else subsample(pilot, sampling, np.random.default_rng([seed, 19]))
        # Scores only: tuning never starts from a pilot's fit.
        measured.append((sampling, train, fit_score(train, valid)[1]))
        log.info("training rows, %s: %d rows, validation ndcg@%d %.4f", sampling.describe(), train.n_rows(), k,
                 measured[-1][2].mean())  # fmt: skip
    means = [float(scores.mean()) for _, _, scores in measured]
    best = int(np.argmax(means))
    sampling_curve, chosen = [], measured[best]
    for sampling, train, scores in measured:
        gap, se = _gap(measured[best][2], scores)
        sampling_curve.append({"sampling": sampling.describe(), "hard": -1 if sampling.hard is None else sampling.hard,
                               "random": sampling.random, "groups": len(train), "rows": train.n_rows(),
                               "ndcg": float(scores.mean()), "gap_to_best": gap, "se": se})  # fmt: skip
        if gap <= search.z * se and train.n_rows() < chosen[1].n_rows():
            chosen = (sampling, train, scores)
    sampling, train, scores = chosen
    log.info("training rows: %s chosen on %d pilot groups (%d of %d rows; validation ndcg@%d %.4f, best %.4f)",
             sampling.describe(), len(pilot), train.n_rows(), pilot.n_rows(), k, scores.mean(),
             measured[best][2].mean())  # fmt: skip

    # 2. The groups: double while doubling pays.
    groups_curve = [{"pairs": used, "groups": len(train), "rows": train.n_rows(), "ndcg": float(scores.mean())}]
    fitted: Fitted | None = None
    while used < len(order):
        target = min(2 * used, len(order))
        build_groups(sources, params, order[used:target], train, sampling, rng, shuffle)
        used = target
        fitted = None  # one fit's matrices alive at a time
        fitted, grown = fit_score(train, valid)
        gain, se = _gap(grown, scores)
        groups_curve.append({"pairs": used, "groups": len(train), "rows": train.n_rows(),
                             "ndcg": float(grown.mean()), "gain": gain, "se": se})  # fmt: skip
        log.info("training groups: %d (%d rows): validation ndcg@%d %.4f (gain %+.4f, se %.4f)",
                 len(train), train.n_rows(), k, grown.mean(), gain, se)  # fmt: skip
        scores = grown
        if gain <= search.z * se:
            break
    plan = RowPlan(sampling, len(train), train.n_rows(), len(order), used, sampling_curve, groups_curve)
    return train, valid, plan, fitted
