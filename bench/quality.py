"""Recommendation quality: this model against single-stage baselines on the same split.

    python -m bench.quality [--datasets synthetic,movielens] [--split temporal|per_user]
                            [--seeds 42,1,2,3,4] [--out bench/results]
    python -m bench.quality --smoke --out DIR      # seconds: tiny data, small grids (CI)

Every system is judged on the model's test users and test items (window 0), with each user's
history at test time (`Window.user_history`) as what it is seeded from and what it may not
recommend again. Baselines are fitted on window 0's item-side history and tuned on window 1
(fitted on window 1's history, judged on window 1's labels), so nothing of the test slice
chooses a hyperparameter; scale-dependent ones (EASE λ, ALS regularisation, ItemKNN shrink)
are tuned as multiples of a statistic of the data and carried to window 0 as that multiple.
The model is trained once per seed; the first seed's run is the one compared, per user,
with the best baseline (paired bootstrap). Writes quality.md, quality.json and quality.png
(per_user split: quality_per_user.*) to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import scipy.sparse as sp

from bench.baselines import (
    PairedInterval,
    als_scores,
    ease_scores,
    fit_ease,
    judge,
    knn_scores,
    ndcg_curve,
    oracle_scores,
    paired_bootstrap,
    rank_rows,
    user_item_matrix,
)
from models.core.candidates import generate_candidates
from models.core.params import CandidateParams
from models.core.tables import ServingTables, build_tables
from training.datasets import Dataset, SyntheticWorld, movielens, synthetic_world
from training.pipeline import (
    BASELINE_COOC_KEY,
    BASELINE_POP_KEY,
    RANKED_DEPTH,
    TrainConfig,
    TrainResult,
    all_time_order,
    train,
)
from training.split import SPLIT_KINDS, SplitConfig, Window, window

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MOVIELENS = Path(os.environ.get("RECSYS_MOVIELENS_DIR", ROOT.parent / "shared" / "data" / "movielens-small"))
DATASETS = ("synthetic", "movielens")
# tests.helpers.small_synthetic()'s size (bench/ may not import tests/).
SMOKE_DATA = {"n_users": 600, "n_items": 400, "n_interactions": 30_000, "n_topics": 20, "seed": 3}
K = 10
DEPTH = 200  # baselines' "candidate recall": recall of their top 200, the model's candidate count
MODEL = "this model"
POPULARITY, COOCCURRENCE, EASE, ALS, ITEMKNN = "popularity", "co-occurrence", "EASE", "ALS", "ItemKNN"
RECENT_POPULARITY = "popularity, recent"  # the order the run chose on window 1 (pop_trend, recent_quantile)
BASELINES = (POPULARITY, RECENT_POPULARITY, COOCCURRENCE, EASE, ALS, ITEMKNN)
SINGLE_STAGE = (COOCCURRENCE, EASE, ALS, ITEMKNN)
# Synthetic data only: the generator's own probabilities, a ceiling rather than a system (it
# reads the truth a model has to infer). Its horizon, in draws, is a multiple of each test
# user's label count (repeats of seen items are draws too), chosen on window 1.
ORACLE = "oracle (the generator's truth)"
ORACLE_HORIZONS = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Grids:
    """Tuning grids. Scale-dependent values are multiples of a statistic of the fitted data."""

    ease_lambda: tuple[float, ...]  # × mean diag(XᵀX) (interactions per item of the universe)
    ease_max_items: int  # EASE's universe: the most popular items, at most this many
    als_factors: tuple[int, ...]
    als_reg: tuple[float, ...]  # × mean interactions per user with any
    knn_k: tuple[int, ...]
    knn_shrink: tuple[float, ...]  # × mean interactions per item with any


# EASE's universe: one dense eigendecomposition of 3,000 items takes ~6 s on one core here
# (9,000 would take ~25×); a compute budget, not a quality choice. The report gives the share
# of the history those items cover.
FULL = Grids(
    ease_lambda=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0), ease_max_items=3000,
    als_factors=(32, 64, 128, 256, 512), als_reg=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
    knn_k=(10, 30, 100, 300, 1000, 3000, 10_000), knn_shrink=(0.0, 0.3, 3.0),
)  # fmt: skip
SMOKE = Grids(
    ease_lambda=(1.0, 10.0, 100.0), ease_max_items=3000, als_factors=(16, 32), als_reg=(1e-2, 1e-1),
    knn_k=(10, 50), knn_shrink=(0.0, 1.0),
)  # fmt: skip


# -- folds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One window as the baselines see it."""

    train: sp.csr_matrix  # all users × items: the window's item-side history
    seen: sp.csr_matrix  # label users × items: each one's history at prediction time
    users: np.ndarray
    relevant: list[np.ndarray]
    last: np.ndarray  # each label user's latest item at prediction time
    tables: ServingTables  # popularity (also every baseline's tie-break) and co-occurrence
    seconds: float  # building the tables: the fit of popularity and co-occurrence

    @property
    def mean_per_user(self) -> float:
        rows = self.train.getnnz(axis=1)
        return float(rows[rows > 0].mean()) if rows.any() else 1.0

    @property
    def mean_per_item(self) -> float:
        cols = self.train.getnnz(axis=0)
        return float(cols[cols > 0].mean()) if cols.any() else 1.0


def make_fold(win: Window, dataset: Dataset, params: CandidateParams) -> Fold:
    start = time.perf_counter()
    n_items = dataset.catalog.n_items
    relevant = [win.label_items[win.label_indptr[j] : win.label_indptr[j + 1]] for j in range(len(win.label_users))]
    tables = build_tables(win.history, dataset.catalog, dataset.catalog.genre_names(), params,
                          user_history=win.user_history)  # fmt: skip
    # Rows are sorted by (user, time): a user's latest item is the last of their rows.
    last = win.user_history.item[np.searchsorted(win.user_history.user, win.label_users, side="right") - 1]
    return Fold(user_item_matrix(win.history, n_items), user_item_matrix(win.user_history, n_items, win.label_users),
                win.label_users, relevant, last, tables, time.perf_counter() - start)  # fmt: skip


# -- systems -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """One system on the test users: per-user metrics, the NDCG@k curve, its cost."""

    per_user: dict[str, np.ndarray]
    curve: np.ndarray  # NDCG@k, k = 1..RANKED_DEPTH
    candidate_recall: float
    seconds: float

    def mean(self, metric: str) -> float:
        return float(self.per_user[metric].mean()) if len(self.per_user[metric]) else 0.0


@dataclass(frozen=True)
class SystemResult:
    name: str
    runs: list[Judged]  # one per seed for the model, one for a baseline
    chosen: str = ""  # hyperparameters chosen on window 1, with their validation NDCG@10
    grid: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> Judged:
        return self.runs[0]


def judged(ranked: list[np.ndarray], fold: Fold, seconds: float, candidate_recall: float | None = None) -> Judged:
    per_user = judge(ranked, fold.relevant, K, DEPTH)
    recall = float(per_user[f"recall@{DEPTH}"].mean()) if candidate_recall is None else candidate_recall
    return Judged(per_user, ndcg_curve(ranked, fold.relevant, RANKED_DEPTH), recall, seconds)


def validation_ndcg(ranked: list[np.ndarray], fold: Fold) -> float:
    return float(judge(ranked, fold.relevant, K, DEPTH)["ndcg"].mean())


def _ranked(scores: np.ndarray, fold: Fold) -> list[np.ndarray]:
    return rank_rows(scores, fold.seen, fold.tables.pop_rank, DEPTH)


def _best(grid: list[dict[str, Any]]) -> dict[str, Any]:
    # Ties go to the earlier (smaller, cheaper) setting.
    return max(grid, key=lambda g: (g["valid_ndcg"], -grid.index(g)))


def _edge(value: float, options: tuple[float, ...]) -> str:
    return " (grid edge)" if len(options) > 1 and value in (min(options), max(options)) else ""


def popularity_lists(fold: Fold, order: np.ndarray) -> list[np.ndarray]:
    lists = []
    for j in range(len(fold.users)):
        seen = fold.seen.indices[fold.seen.indptr[j] : fold.seen.indptr[j + 1]]
        head = order[: DEPTH + len(seen)]
        lists.append(head[~np.isin(head, seen)][:DEPTH])
    return lists


def cooccurrence_lists(fold: Fold, params: CandidateParams) -> list[np.ndarray]:
    """The model's candidate list in generation order: co-occurrence, then popularity."""
    return [generate_candidates(fold.tables, int(u), params)[0][:DEPTH] for u in fold.users]


def run_popularity(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    ranked = popularity_lists(test, all_time_order(test.tables))
    return SystemResult(POPULARITY, [judged(ranked, test, test.seconds + time.perf_counter() - start)])


def run_recent_popularity(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    ranked = popularity_lists(test, test.tables.pop_order)
    chosen = f"pop_trend {args.candidates.pop_trend:g}, recent_quantile {args.candidates.recent_quantile:g}"
    return SystemResult(RECENT_POPULARITY, [judged(ranked, test, test.seconds + time.perf_counter() - start)], chosen)


def run_cooccurrence(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    ranked = cooccurrence_lists(test, args.candidates)
    return SystemResult(COOCCURRENCE, [judged(ranked, test, test.seconds + time.perf_counter() - start)])


def run_ease(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    fit = fit_ease(valid.train, grids.ease_max_items)
    grid = [{"lambda_x": m, "lambda": lam, "valid_ndcg": validation_ndcg(_ranked(s, valid), valid)}
            for m, (lam, s) in zip(grids.ease_lambda, ease_scores(fit, valid.seen, [m * fit.mean_diag for m in
                                                                                     grids.ease_lambda]), strict=True)]  # fmt: skip
    best = _best(grid)
    fit = fit_ease(test.train, grids.ease_max_items)
    lam = best["lambda_x"] * fit.mean_diag
    _, scores = next(ease_scores(fit, test.seen, [lam]))
    ranked = _ranked(scores, test)
    counts = np.asarray(test.train.sum(axis=0)).ravel()
    cover = counts[fit.universe].sum() / max(counts.sum(), 1)
    chosen = (f"λ = {best['lambda_x']:g} × mean diag(XᵀX) = {lam:.1f}{_edge(best['lambda_x'], grids.ease_lambda)}; "
              f"{len(fit.universe):,} items ({cover:.0%} of the history)")  # fmt: skip
    return SystemResult(EASE, [judged(ranked, test, time.perf_counter() - start)], chosen, grid)


def run_als(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    grid = []
    for factors in grids.als_factors:
        for reg_x in grids.als_reg:
            s = als_scores(valid.train, valid.seen, factors, reg_x * valid.mean_per_user, args.baseline_seed, args.threads)
            grid.append({"factors": factors, "reg_x": reg_x, "valid_ndcg": validation_ndcg(_ranked(s, valid), valid)})
    best = _best(grid)
    reg = best["reg_x"] * test.mean_per_user
    scores = als_scores(test.train, test.seen, best["factors"], reg, args.baseline_seed, args.threads)
    chosen = (f"{best['factors']} factors{_edge(best['factors'], grids.als_factors)}, regularisation "
              f"{best['reg_x']:g} × interactions per user = {reg:.3g}{_edge(best['reg_x'], grids.als_reg)}")  # fmt: skip
    return SystemResult(ALS, [judged(_ranked(scores, test), test, time.perf_counter() - start)], chosen, grid)


def run_itemknn(valid: Fold, test: Fold, grids: Grids, args: argparse.Namespace) -> SystemResult:
    start = time.perf_counter()
    grid = []
    for shrink_x in grids.knn_shrink:
        for k, s in knn_scores(valid.train, valid.seen, grids.knn_k, shrink_x * valid.mean_per_item).items():
            grid.append({"k": k, "shrink_x": shrink_x, "valid_ndcg": validation_ndcg(_ranked(s, valid), valid)})
    best = _best(grid)
    shrink = best["shrink_x"] * test.mean_per_item
    (scores,) = knn_scores(test.train, test.seen, [best["k"]], shrink).values()
    every = best["k"] >= valid.train.shape[1] - 1
    k_text = f"{best['k']} (every item)" if every else f"{best['k']}{_edge(best['k'], grids.knn_k)}"
    chosen = (f"k = {k_text}, shrink {best['shrink_x']:g} × interactions per "
              f"item = {shrink:.3g}{_edge(best['shrink_x'], grids.knn_shrink)}")  # fmt: skip
    return SystemResult(ITEMKNN, [judged(_ranked(scores, test), test, time.perf_counter() - start)], chosen, grid)


def run_oracle(valid: Fold, test: Fold, world: SyntheticWorld, dataset: Dataset) -> SystemResult:
    start = time.perf_counter()
    # Generator numbers: item i<N> and user u<N> are the generator's N.
    items = np.array([int(i[1:]) for i in dataset.catalog.item_ids])
    users = np.array([int(u[1:]) for u in dataset.log.user_ids])

    def scores(fold: Fold, multiple: float) -> np.ndarray:
        horizons = multiple * np.array([len(r) for r in fold.relevant])
        return oracle_scores(world, items, users[fold.users], fold.last, horizons)

    grid = [{"horizon_x": m, "valid_ndcg": validation_ndcg(_ranked(scores(valid, m), valid), valid)}
            for m in ORACLE_HORIZONS]  # fmt: skip
    best = _best(grid)
    ranked = _ranked(scores(test, best["horizon_x"]), test)
    chosen = f"horizon {best['horizon_x']:g} × the user's test items{_edge(best['horizon_x'], ORACLE_HORIZONS)}"
    return SystemResult(ORACLE, [judged(ranked, test, time.perf_counter() - start)], chosen, grid)


RUNNERS: dict[str, Callable[[Fold, Fold, Grids, argparse.Namespace], SystemResult]] = {
    POPULARITY: run_popularity, RECENT_POPULARITY: run_recent_popularity, COOCCURRENCE: run_cooccurrence,
    EASE: run_ease, ALS: run_als, ITEMKNN: run_itemknn,
}  # fmt: skip


def run_model(dataset: Dataset, split: SplitConfig, seeds: list[int], threads: int) -> tuple[SystemResult, TrainResult]:
    """Train once per seed; returns the runs and the first seed's TrainResult."""
    runs, first = [], None
    for seed in seeds:
        start = time.perf_counter()
        result = train(dataset, TrainConfig(split=split, seed=seed, nthread=threads), save=False)
        seconds = time.perf_counter() - start
        assert result.evaluation is not None and result.test_window is not None
        fold_relevant = [result.test_window.label_items[a:b] for a, b in
                         zip(result.test_window.label_indptr[:-1], result.test_window.label_indptr[1:], strict=True)]  # fmt: skip
        if not np.array_equal(result.evaluation.users, result.test_window.label_users):
            raise RuntimeError("the evaluation's users are not the test window's label users")
        per_user = judge(result.evaluation.ranked, fold_relevant, K, DEPTH)
        # The bench's metrics are the pipeline's: a check that both read the same lists.
        if abs(per_user["ndcg"].mean() - result.metrics["model"]["ndcg"]) > 1e-9:
            raise RuntimeError(f"NDCG@{K} from the ranked lists {per_user['ndcg'].mean():.6f} != the pipeline's "
                               f"{result.metrics['model']['ndcg']:.6f}")  # fmt: skip
        curve = ndcg_curve(result.evaluation.ranked, fold_relevant, RANKED_DEPTH)
        runs.append(Judged(per_user, curve, float(result.metrics["candidate_recall"]), seconds))
        if first is None:
            first = result
        print(f"  model seed {seed}: NDCG@{K} {runs[-1].mean('ndcg'):.4f} ({seconds:.1f} s)", flush=True)
    assert first is not None
    return SystemResult(MODEL, runs, f"seeds {', '.join(map(str, seeds))}"), first


@dataclass(frozen=True)
class DatasetResult:
    name: str
    facts: str
    systems: list[SystemResult]
    best_baseline: str
    interval: PairedInterval


def run_dataset(dataset: Dataset, world: SyntheticWorld | None, args: argparse.Namespace, grids: Grids) -> DatasetResult:
    split = SplitConfig(kind=args.split)
    print(f"{dataset.name}: training the model ({len(args.seeds)} seeds)", flush=True)
    model, result = run_model(dataset, split, args.seeds, args.threads)
    assert result.test_window is not None
    # The candidate parameters the (first seed's) run chose on window 1, popularity's order
    # among them: popularity and co-occurrence are the pipeline's own, tuned the same way.
    chosen = CandidateParams.from_dict(result.metadata["params"]["candidates"])
    args = argparse.Namespace(**{**vars(args), "candidates": chosen})
    test = make_fold(result.test_window, dataset, args.candidates)
    valid = make_fold(window(dataset.log, 1, split), dataset, args.candidates)
    systems = [model]
    for name in BASELINES:
        systems.append(RUNNERS[name](valid, test, grids, args))
        r = systems[-1]
        print(f"  {name}: NDCG@{K} {r.first.mean('ndcg'):.4f} ({r.first.seconds:.1f} s) {r.chosen}", flush=True)
    if world is not None:
        systems.append(run_oracle(valid, test, world, dataset))
        print(f"  {ORACLE}: NDCG@{K} {systems[-1].first.mean('ndcg'):.4f} {systems[-1].chosen}", flush=True)
    # The pipeline's own two baselines, computed there from the same tables: the same figures.
    for name, key in ((POPULARITY, BASELINE_POP_KEY), (COOCCURRENCE, BASELINE_COOC_KEY)):
        ours = next(s for s in systems if s.name == name).first.mean("ndcg")
        if abs(ours - result.metrics[key]["ndcg"]) > 1e-9:
            raise RuntimeError(f"{name}: NDCG@{K} {ours:.6f} here, {result.metrics[key]['ndcg']:.6f} in the pipeline")
    # The best single-stage baseline, as the bar names them (popularity is judged
    # apart: its bar is 1.5x).
    best = max((s for s in systems if s.name in SINGLE_STAGE), key=lambda s: s.first.mean("ndcg"))
    interval = paired_bootstrap(model.first.per_user["ndcg"], best.first.per_user["ndcg"], args.resamples,
                                args.bootstrap_seed)  # fmt: skip
    log = dataset.log
    facts = (f"{log.n_users:,} users, {dataset.catalog.n_items:,} items, {len(log):,} interactions; "
             f"{len(test.users):,} test users, {sum(len(r) for r in test.relevant):,} test items; "
             f"{len(valid.users):,} users in validation window 1")  # fmt: skip
    return DatasetResult(dataset.name, facts, systems, best.name, interval)


# -- report --------------------------------------------------------------------------------

COLUMNS = (("ndcg", f"NDCG@{K}"), ("recall", f"Recall@{K}"), ("hitrate", f"HitRate@{K}"), ("map", f"MAP@{K}"))


def _cell(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(res: DatasetResult) -> list[str]:
    head = ["system", *(c for _, c in COLUMNS), "candidate recall", "time (s)", "chosen on window 1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res.systems:
        cells = [_cell([r.mean(m) for r in s.runs]) for m, _ in COLUMNS]
        cells += [_cell([r.candidate_recall for r in s.runs]), _cell([r.seconds for r in s.runs], 1), s.chosen]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    return lines


def interval_line(res: DatasetResult, seed: int) -> str:
    i = res.interval
    return (f"Model (seed {seed}) over the best baseline ({res.best_baseline}), NDCG@{K}, paired bootstrap "
            f"{i.level:.0%} ({i.n_resamples:,} resamples of {i.n_users:,} test users): ratio {i.ratio:.3f} "
            f"[{i.ratio_lo:.3f}, {i.ratio_hi:.3f}], difference {i.diff:+.4f} [{i.diff_lo:+.4f}, {i.diff_hi:+.4f}]")  # fmt: skip


def machine_facts(threads: int) -> str:
    import implicit
    import xgboost

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"load average at start {load}; {threads} threads; Python {platform.python_version()}, numpy "
            f"{np.__version__}, xgboost {xgboost.__version__}, implicit {implicit.__version__}; code {commit}")  # fmt: skip


def _values(values: tuple[float, ...]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def write_report(out: Path, stem: str, results: list[DatasetResult], args: argparse.Namespace, machine: str,
                 grids: Grids) -> str:  # fmt: skip
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# Recommendation quality against single-stage baselines", "",
        (f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Split: {args.split}. Model seeds: {seeds} "
         f"(a cell is the mean with the min–max in brackets; the paired comparison uses seed {args.seeds[0]})."),
        f"Machine: {machine}.", "",
        (f"Every system ranks for the same test users and test items (window 0) and never lists an item the user "
         f"already has. Candidate recall: the model's is the share of test items among its candidates, a "
         f"baseline's that of its top {DEPTH}. Baselines are fitted on window 0's history and tuned on window 1 "
         f"(NDCG@{K}); λ, regularisation and shrink as multiples of the data's scale, so the grids are the same "
         f"for every data set. EASE is restricted to the {grids.ease_max_items:,} most popular items (a compute "
         f"budget). ALS folds the test users in from their history. Time: the model's whole `train()` "
         f"(windows, ranker fit, evaluation); a baseline's tuning, refit and scoring (popularity and "
         f"co-occurrence: building the window's tables). The oracle (synthetic data only) is no system: it ranks "
         f"by the generator's own chances of each item in the user's next draws, from the truth a model has to "
         f"infer (favourite topics, the current topic, the weights), so it marks about how far any model can go."),
        (f"Grids: EASE λ ∈ {_values(grids.ease_lambda)} × mean diag(XᵀX); ALS {_values(grids.als_factors)} factors "
         f"× regularisation ∈ {_values(grids.als_reg)} × interactions per user (15 iterations, α = 1); ItemKNN "
         f"k ∈ {_values(grids.knn_k)} (capped at every item) × shrink ∈ {_values(grids.knn_shrink)} × interactions "
         f"per item. \"grid edge\": the choice is an end of its grid, so a wider grid might do better."),
    ]  # fmt: skip
    for res in results:
        lines += ["", f"## {res.name}", "", res.facts, "", *table(res), "", interval_line(res, args.seeds[0])]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    payload = {
        "split": args.split, "seeds": args.seeds, "machine": machine, "k": K, "depth": DEPTH,
        "datasets": {res.name: {
            "facts": res.facts, "best_baseline": res.best_baseline, "interval": vars(res.interval),
            "systems": {s.name: {"chosen": s.chosen, "grid": s.grid, "runs": [
                {**{m: r.mean(m) for m, _ in COLUMNS}, "candidate_recall": r.candidate_recall, "seconds": r.seconds,
                 "ndcg_curve": r.curve.tolist()} for r in s.runs]} for s in res.systems},
        } for res in results},
    }  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    plot(out / f"{stem}.png", results, args.split)
    return text


def plot(path: Path, results: list[DatasetResult], split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    ks = np.arange(1, RANKED_DEPTH + 1)
    for ax, res in zip(axes[0], results, strict=True):
        for s in res.systems:
            curves = np.array([r.curve for r in s.runs])
            (line,) = ax.plot(ks, curves.mean(axis=0), label=s.name, lw=2.2 if s.name == MODEL else 1.4)
            if len(curves) > 1:
                ax.fill_between(ks, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_title(f"{res.name} ({split} split)")
        ax.set_xlabel("k")
        ax.set_ylabel("NDCG@k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- CLI -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def _datasets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown data sets {bad}; valid: {list(DATASETS)}")
    return names


def load_datasets(names: Iterable[str], smoke: bool, movielens_dir: Path,
                  ) -> list[tuple[Dataset, SyntheticWorld | None]]:  # fmt: skip
    """Each data set, with the generator's truth for the synthetic one."""
    out: list[tuple[Dataset, SyntheticWorld | None]] = []
    for name in names:
        if name == "synthetic":
            out.append(synthetic_world(**SMOKE_DATA) if smoke else synthetic_world())
        elif (movielens_dir / "ratings.csv").exists():
            out.append((movielens(movielens_dir), None))
        else:
            print(f"movielens: skipped, no ratings.csv in {movielens_dir} (--movielens sets the folder)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=_datasets, default=list(DATASETS), help="comma-separated: synthetic,movielens")
    p.add_argument("--split", choices=SPLIT_KINDS, default="temporal")
    p.add_argument("--seeds", type=_ints, default=[42, 1, 2, 3, 4], help="model training seeds; the first is compared")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, one seed, small grids (CI)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--movielens", type=Path, default=MOVIELENS, help="folder with ratings.csv and movies.csv")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="XGBoost and ALS threads")
    p.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--baseline-seed", type=int, default=42, help="ALS's random state")
    args = p.parse_args(argv)
    if args.threads < 1 or args.resamples < 1:
        p.error(f"--threads and --resamples must be >= 1, got {args.threads} and {args.resamples}")
    if args.smoke:
        args.datasets, args.seeds = ["synthetic"], args.seeds[:1]
    args.candidates = TrainConfig().candidates  # the model's candidate parameters, for co-occurrence
    grids = SMOKE if args.smoke else FULL
    machine = machine_facts(args.threads)  # the load average before this run adds its own

    # Loaded before the limit below so that it reaches every BLAS library: implicit asks for
    # one BLAS thread, and with two, OpenBLAS's eigh and implicit's ALS ran 18 to 25 times
    # slower on this shared 2-core machine (XGBoost's OpenMP threads are not affected).
    for module in ("implicit.cpu.als", "scipy.linalg"):
        importlib.import_module(module)
    from threadpoolctl import threadpool_limits

    datasets = load_datasets(args.datasets, args.smoke, args.movielens)
    if not datasets:
        print("no data set to run", file=sys.stderr)
        return 2
    with threadpool_limits(limits=1, user_api="blas"):
        results = [run_dataset(d, world, args, grids) for d, world in datasets]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality" if args.split == "temporal" else f"quality_{args.split}"
    print(write_report(args.out, stem, results, args, machine, grids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
