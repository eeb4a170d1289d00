"""The training pipeline: split, choose retrieval on validation, build labelled candidate
groups per time window, tune and fit the XGBoost ranker (training/tuning.py), evaluate it
against the popularity and co-occurrence baselines on the test slice, and save a new version
(booster, serving tables, report, lineage) to the store.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import platform
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pyarrow as pa
import xgboost as xgb
from tqdm import tqdm

from models.core.candidates import generate_candidates
from models.core.drift import ReferenceProfile, build_profile
from models.core.features import build_features
from models.core.metrics import mean_metrics, ranking_metrics
from models.core.params import CandidateParams
from models.core.ranking import predict_scores, top_k
from models.core.schema import FEATURE_NAMES, ITEM_FEATURES, N_FEATURES, SCHEMA_HASH, schema_as_dict
from models.core.tables import ServingTables, build_tables
from models.lifecycle.registry import ensure_local
from models.lifecycle.store import DEFAULT_MODEL_NAME, open_version, save_version
from training.datasets import DataError, Dataset
from training.engine import Engine
from training.groups import Groups, collect_groups, label_items
from training.ranker import Fitted, RankerParams, ranker_kwargs
from training.report import write_report
from training.retrieval import choose_retrieval
from training.tracking import TrainingRun, save_registered, training_run
from training.rows import RowPlan, RowSearch, WindowSource, base_fit_scorer, choose_rows
from training.split import SplitConfig, Window, sample_label_users, window
from training.tuning import DEFAULT_SIGNIFICANCE, DEFAULT_TUNE_BUDGET_S, DEFAULT_TUNE_MAX_TRIALS, tune_ranker

log = logging.getLogger("training")

MODEL_KEY = "model"
BASELINE_POP_KEY = "baseline_popularity"
BASELINE_COOC_KEY = "baseline_cooccurrence"


@dataclass(frozen=True)
class TrainConfig:
    split: SplitConfig = field(default_factory=SplitConfig)
    candidates: CandidateParams = field(default_factory=CandidateParams)
    ranker: RankerParams = field(default_factory=RankerParams)  # the base of the search, its first trial
    n_windows: int = 3  # label windows before the test slice
    eval_user_frac: float = 0.2  # users whose groups drive early stopping
    k: int = 10
    seed: int = 42
    nthread: int = 0  # 0: all cores
    # Seconds of ranker hyperparameter search on the validation groups (training/tuning.py);
    # 0: the base parameters only. The search stops at this budget or after tune_max_trials;
    # its top trial replaces the base if its gain passes a test at tune_significance.
    tune_budget_s: float = DEFAULT_TUNE_BUDGET_S
    tune_max_trials: int = DEFAULT_TUNE_MAX_TRIALS
    tune_significance: float = DEFAULT_SIGNIFICANCE
    # A sanity check of the promotion gate: labels permuted within each group, so the
    # ranker learns nothing real (never set it for a model you mean to serve).
    shuffle_labels: bool = False
    # Choose EASE's λ and the candidate mix on the latest label window (training/retrieval.py);
    # off: `candidates` as given.
    select_retrieval: bool = True
    # Lean training rows (training/rows.py): every positive, hard and random negatives, and
    # as many groups as validation says pay, chosen in the run; off: every candidate of
    # every labelled user (the full training, for comparison).
    lean_rows: bool = True
    rows: RowSearch = field(default_factory=RowSearch)
    # Test users evaluated, a seeded draw when there are more: the standard error of a mean
    # NDCG over n users is at most 0.5/sqrt(n), 0.0035 at 20,000.
    max_test_users: int = 20_000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    tag: str | None
    metrics: dict[str, Any]
    timings: dict[str, float]
    metadata: dict[str, Any]
    champion_metrics: dict[str, Any] | None = None  # the champion's, on the same hold-out
    evaluation: Evaluation | None = None  # the test slice's rankings, for benchmarks
    test_window: Window | None = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # by stage, as timings


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageLog:
    """Staged progress with timings and memory: `with stages("name"):` logs start, end,
    duration and the peak resident memory during the stage (sampled every 0.1 s by a thread
    that lives as long as the stage)."""

    SAMPLE_S = 0.1

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("▶ %s", name)
        start = time.perf_counter()
        peak = [_rss_bytes()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.SAMPLE_S):
                peak[0] = max(peak[0], _rss_bytes())

        sampler = threading.Thread(target=sample, name=f"rss:{name}", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            peak[0] = max(peak[0], _rss_bytes())
            self.timings[name] = round(time.perf_counter() - start, 3)
            self.peak_rss_mb[name] = round(peak[0] / 2**20, 1)
        log.info("✔ %s (%.2f s, peak %.0f MB)", name, self.timings[name], self.peak_rss_mb[name])

    def summary(self) -> str:
        """A table of every stage: seconds and peak resident memory, the slowest marked."""
        if not self.timings:
            return "(no stages)"
        slowest = max(self.timings, key=lambda n: self.timings[n])
        width = max(len(n) for n in self.timings)
        lines = [f"{'stage':{width}}  {'seconds':>8}  {'peak MB':>8}"]
        for stage_name, seconds in self.timings.items():
            mark = "  <- slowest" if stage_name == slowest else ""
            lines.append(f"{stage_name:{width}}  {seconds:8.1f}  {self.peak_rss_mb[stage_name]:8.0f}{mark}")
        lines.append(f"{'total':{width}}  {sum(self.timings.values()):8.1f}  {max(self.peak_rss_mb.values()):8.0f}")
        return "\n".join(lines)


RANKED_DEPTH = 50  # how much of each test user's ranked list an evaluation keeps


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    users: np.ndarray  # the test users, in the order of `ranked`
    ranked: list[np.ndarray]  # per test user: the model's top RANKED_DEPTH items, best first


def all_time_order(tables: ServingTables) -> np.ndarray:
    """Items by all-time interaction count, most first (ties: lower index first)."""
    count = tables.item_feats[:, ITEM_FEATURES.index("item_log_pop")]
    return np.lexsort((np.arange(tables.n_items), -count)).astype(np.int32)


# Test users whose feature rows are built and scored at once: 2,000 × 200 candidates is
# ~50 MB of float32 rows, where all of ml-25m's 20,000 at once held ~1 GB.
EVAL_CHUNK_USERS = 2000


def evaluate(
    booster: xgb.Booster, tables: ServingTables, win: Window, params: CandidateParams, k: int
) -> Evaluation:
    """Model and baselines on the same users and the same test items."""
    model_rows, pop_rows, cooc_rows, recall = [], [], [], []
    ranked_lists: list[np.ndarray] = []
    # Popularity baseline: the most interacted-with items of all time (the model's own
    # popularity order may weigh recent counts, chosen on validation; that is the model's).
    all_time = all_time_order(tables)
    bar = tqdm(total=len(win.label_users), desc="evaluate", leave=False, disable=None)
    for start in range(0, len(win.label_users), EVAL_CHUNK_USERS):
        per_user: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        features: list[np.ndarray] = []
        for j in range(start, min(start + EVAL_CHUNK_USERS, len(win.label_users))):
            user = int(win.label_users[j])
            items, cooc = generate_candidates(tables, user, params)
            features.append(build_features(tables, user, items, cooc))
            per_user.append((items, label_items(win, j), tables.history(user)))
        scores = predict_scores(booster, np.vstack(features))
        bounds = np.cumsum([0] + [len(f) for f in features])
        del features
        for j, (items, relevant, seen) in enumerate(per_user):
            deep, _ = top_k(items, scores[bounds[j] : bounds[j + 1]], max(k, RANKED_DEPTH))
            ranked_lists.append(deep)
            model_rows.append(ranking_metrics(deep[:k], relevant, k))
            # Co-occurrence baseline: the candidates in generation order (co-occurrence score,
            # then popularity to fill), i.e. the list without the ranker.
            cooc_rows.append(ranking_metrics(items[:k], relevant, k))
            head = all_time[: k + len(seen)]
            pop_rows.append(ranking_metrics(head[~np.isin(head, seen)][:k], relevant, k))
            recall.append(np.isin(relevant, items).mean())
        bar.update(len(per_user))
    bar.close()
    metrics = {
        MODEL_KEY: mean_metrics(model_rows),
        BASELINE_POP_KEY: mean_metrics(pop_rows),
        BASELINE_COOC_KEY: mean_metrics(cooc_rows),
        "candidate_recall": float(np.mean(recall)) if recall else 0.0,
        "test_users": len(model_rows),
        "k": k,
    }
    return Evaluation(metrics, win.label_users, ranked_lists)


PROFILE_USERS = 2000  # users whose served candidates make the drift reference profile


def serving_profile(
    booster: xgb.Booster, serving: ServingTables, params: CandidateParams, k: int,
    rng: np.random.Generator, cold_start_share: float,
) -> ReferenceProfile:
    """The drift reference: what the service scores for its known users, i.e. features from
    the serving tables (not the test slice's, which see an earlier past and only the users
    active after the cutoff) for a seeded sample of users, and the popularity of their top k."""
    known = np.flatnonzero(np.diff(serving.hist_indptr) > 0)
    users = rng.choice(known, size=min(PROFILE_USERS, len(known)), replace=False) if len(known) else known
    features = []
    for user in users.tolist():
        items, cooc = generate_candidates(serving, user, params)
        features.append(build_features(serving, user, items, cooc))
    matrix = np.vstack(features) if features else np.zeros((0, N_FEATURES), dtype=np.float32)
    scores = predict_scores(booster, matrix)
    bounds = np.cumsum([0] + [len(f) for f in features])
    pop = matrix[:, FEATURE_NAMES.index("item_log_pop")]
    recommended_pop = np.concatenate(
        [pop[lo:hi][np.argsort(-scores[lo:hi], kind="stable")[:k]] for lo, hi in itertools.pairwise(bounds)]
        or [np.zeros(0, dtype=np.float32)]
    )
    return build_profile(matrix, scores, cold_start_share, recommended_pop)


def _code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def metrics_table(metrics: dict[str, Any]) -> str:
    k = metrics["k"]
    rows = [f"| {'':24} | NDCG@{k} | Recall@{k} | HitRate@{k} | MAP@{k} |", "|" + "---|" * 5]
    for key in (MODEL_KEY, BASELINE_COOC_KEY, BASELINE_POP_KEY):
        m = metrics[key]
        rows.append(f"| {key:24} | {m['ndcg']:.4f} | {m['recall']:.4f} | {m['hitrate']:.4f} | {m['map']:.4f} |")
    return "\n".join(rows)


def window_tables(
    win: Window, dataset: Dataset, genre_names: list[str], params: CandidateParams,
    cooc_from: ServingTables | None = None,
) -> ServingTables:
    """The tables a window's features see: its past only (`cooc_from`: see build_tables)."""
    return build_tables(win.history, dataset.catalog, genre_names, params, user_history=win.user_history,
                        cooc_from=cooc_from)  # fmt: skip


def evaluate_version(
    tag: str, dataset: Dataset, test: Window, genre_names: list[str], config: TrainConfig
) -> dict[str, Any]:
    """Another stored version (the champion) on this run's test slice: its own booster and
    candidate parameters, tables from the same history, the same users and test items."""
    ensure_local(tag)  # a champion trained on another machine: fetched from the registry, checked
    version = open_version(tag)
    tables = window_tables(test, dataset, genre_names, version.params)
    return evaluate(version.load_booster(config.nthread), tables, test, version.params, config.k).metrics


def train(
    dataset: Dataset, config: TrainConfig = TrainConfig(), model_name: str = DEFAULT_MODEL_NAME,
    save: bool = True, compare_with: str | None = None, engine: Engine | None = None,
) -> TrainResult:
    """Train, evaluate and (if `save`) add one version to the store and to the MLflow
    registry, all inside one MLflow run (training/tracking.py). With `compare_with` (a tag),
    that version is evaluated on the same fresh hold-out too, before anything is saved.
    Raises DataError for data that cannot be split or learned from, ModelCheckError for a
    version to compare with that cannot be used; nothing is written to the store or the
    registry then (the run ends FAILED)."""
    with training_run(model_name, f"train {dataset.name}{'' if save else ' (dry run)'}") as run:
        return _train(dataset, config, model_name, save, compare_with, engine, run)


def _train(
    dataset: Dataset, config: TrainConfig, model_name: str, save: bool, compare_with: str | None,
    engine: Engine | None, run: TrainingRun,
) -> TrainResult:
    # What reading the data left in Arrow's memory pool (1.2 GB of 1.9 resident after
    # loading ml-25m's shape) goes back to the system before the stages that need memory.
    pa.default_memory_pool().release_unused()
    stages = StageLog()
    log_ = dataset.log
    genre_names = dataset.catalog.genre_names()
    rng = np.random.default_rng(config.seed)
    eval_users = rng.random(log_.n_users) < config.eval_user_frac

    # Built one at a time: a window's histories are dropped once its tables are built.
    first_window = window(log_, 1, config.split) if config.n_windows else None
    retrieval_selection: dict[str, Any] = {"skipped": "select_retrieval is off"}
    measured_tables: ServingTables | None = None  # window 1's, as retrieval measured on them
    if config.select_retrieval and first_window is not None:
        with stages("choose retrieval (EASE λ, candidate mix) on window 1"):
            selection = choose_retrieval(first_window, dataset.catalog, genre_names, config.candidates,
                                         config.seed)  # fmt: skip
        config, retrieval_selection = replace(config, candidates=selection.params), selection.curve
        measured_tables = selection.tables

    train_groups, valid_groups = Groups(), Groups()
    sources: list[WindowSource] = []
    for w in range(1, config.n_windows + 1):
        win = first_window if w == 1 and first_window is not None else window(log_, w, config.split)
        first_window = None
        with stages(f"window {w}: tables"):
            if len(win.label_users) == 0:
                continue
            tables = window_tables(win, dataset, genre_names, config.candidates,
                                   cooc_from=measured_tables if w == 1 else None)  # fmt: skip
            measured_tables = None
            if engine is not None:  # built on the workers, kept there
                engine.add_window(tables, win, config.candidates, eval_users, qid_base=w * log_.n_users,
                                  shuffle_seed=config.seed if config.shuffle_labels else None)  # fmt: skip
                continue
            sources.append(WindowSource(tables, win.labels_only(), eval_users[win.label_users]))
        del win
    # Lean rows only where every candidate of every user would be many rows to fit.
    full_rows = sum(int((~src.valid).sum()) for src in sources) * (
        config.candidates.n_cooc + config.candidates.n_ease + config.candidates.n_pop)  # fmt: skip
    lean = engine is None and config.lean_rows and full_rows > config.rows.full_rows_budget
    if engine is None and not lean and sources:
        if config.lean_rows:
            log.info("training rows: every candidate (%d rows with every candidate, within the budget of %d)",
                     full_rows, config.rows.full_rows_budget)  # fmt: skip
        with stages("labelled candidates"):
            for src in sources:
                collect_groups(src.tables, src.win, config.candidates, eval_users, train_groups, valid_groups,
                               qid_base=src.win.index * log_.n_users,
                               shuffle=rng if config.shuffle_labels else None)  # fmt: skip
        sources = []
    row_plan: RowPlan | None = None
    base_fit: Fitted | None = None
    if lean and sources:
        with stages("training rows: sampling and groups chosen on validation"):
            fit_score = base_fit_scorer(config.ranker, config.k, config.seed, config.nthread)
            train_groups, valid_groups, row_plan, base_fit = choose_rows(
                sources, config.candidates, config.k, config.seed, fit_score, config.rows,
                shuffle=rng if config.shuffle_labels else None,
            )  # fmt: skip
        del sources  # the windows' tables
    if engine is None and (len(train_groups) < 10 or len(valid_groups) < 2):
        raise DataError(
            f"{dataset.name}: too few labelled users to train ({len(train_groups)} train, "
            f"{len(valid_groups)} validation groups; rule: at least 10 and 2). Give more "
            "interactions per user or more users"
        )

    tuning: dict[str, Any] | None = None
    with stages("tune and fit ranker" if engine is None else "labelled candidates and fit ranker on Dask"):
        if engine is None:
            tuned = tune_ranker(train_groups, valid_groups, config.ranker, config.k, config.tune_budget_s,
                                config.seed, config.nthread, config.tune_max_trials, config.tune_significance,
                                base_fit)  # fmt: skip
            base_fit = None  # its matrices: tuning was their last use
            booster, curve, best_round, ranker = tuned.booster, tuned.curve, tuned.best_round, tuned.params
            tuning = tuned.summary()
            n_train, n_valid = len(train_groups), len(valid_groups)
        else:  # the Dask engine fits the base parameters, untuned
            ranker = config.ranker
            booster, curve, best_round, n_train, n_valid = engine.fit(
                ranker_kwargs(ranker, config.k, config.seed), config.k)  # fmt: skip

    with stages("evaluate on the test slice"):
        test = sample_label_users(window(log_, 0, config.split), config.max_test_users,
                                  np.random.default_rng([config.seed, 0]))  # fmt: skip
        if len(test.label_users) == 0:
            raise DataError(
                f"{dataset.name}: no user has test items (rule, {config.split.kind} split: a user with "
                f"at least min_history={config.split.min_history} items before them)"
            )
        test_tables = window_tables(test, dataset, genre_names, config.candidates)
        evaluation = evaluate(booster, test_tables, test, config.candidates, config.k)
        metrics = evaluation.metrics
    log.info("results on %d test users:\n%s", metrics["test_users"], metrics_table(metrics))
    log.info("candidate recall (share of test items among the candidates): %.4f", metrics["candidate_recall"])
    champion_metrics = None
    if compare_with is not None:
        with stages(f"evaluate {compare_with} on the same test slice"):
            champion_metrics = evaluate_version(compare_with, dataset, test, genre_names, config)
        log.info("%s on the same users:\n%s", compare_with, metrics_table(champion_metrics))

    with stages("serving tables from all interactions"):
        serving = build_tables(log_, dataset.catalog, genre_names, config.candidates)

    with stages("reference profile for drift monitoring"):
        # Users at test time with no history: what the service will answer with a fallback.
        history_len = np.diff(test_tables.hist_indptr)
        active = log_.user_counts() > 0
        profile = serving_profile(
            booster, serving, config.candidates, config.k, rng,
            cold_start_share=float(np.mean(history_len[active] == 0)) if active.any() else 0.0,
        )  # fmt: skip

    gain = booster.get_score(importance_type="total_gain")
    importance = {FEATURE_NAMES[int(f[1:])]: float(v) for f, v in gain.items()}
    metadata: dict[str, Any] = {
        "dataset": {
            "name": dataset.name,
            "content_hash": dataset.content_hash,
            "source": dataset.source,
            "n_interactions": len(log_),
            "n_users": log_.n_users,
            "n_items": dataset.catalog.n_items,
            "train_groups": n_train,
            "validation_groups": n_valid,
            "test_users": metrics["test_users"],
            "test_cutoff": test.cutoff if test.cutoff is not None else "per user",
        },
        "params": {
            "candidates": config.candidates.to_dict(),
            "ranker": asdict(ranker),  # as chosen by tuning; its base is metadata["tuning"]["trials"][0]
            "split": asdict(config.split),
            "n_windows": config.n_windows,
            "eval_user_frac": config.eval_user_frac,
            "seed": config.seed,
            "shuffle_labels": config.shuffle_labels,
            "engine": "local" if engine is None else f"dask ({engine.describe()})",
        },
        "metrics": metrics,
        "best_round": best_round,
        "validation_ndcg_curve": curve,
        "retrieval_selection": retrieval_selection,
        "feature_importance": importance,
        "feature_schema": schema_as_dict(),
        "schema_hash": SCHEMA_HASH,
        "versions": {
            "xgboost": xgb.__version__,
            "bentoml": bentoml.__version__,
            "python": platform.python_version(),
        },
        "code_version": _code_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "timings_s": stages.timings,
        "peak_rss_mb": stages.peak_rss_mb,
    }
    if row_plan is not None:
        metadata["training_rows"] = row_plan.as_dict()
    if tuning is not None:  # BentoML metadata takes no None values
        metadata["tuning"] = tuning
    if compare_with is not None:
        metadata["compared_with"] = {"tag": compare_with, "metrics": champion_metrics}
    def write_extras(folder: Path) -> None:
        write_report(folder, curve, best_round, importance, config.k)
        profile.save(folder)

    run.log_results(metadata)
    tag = None
    if save:
        labels = {"dataset": dataset.name, "schema": SCHEMA_HASH, "objective": config.ranker.objective}
        with stages("save to the BentoML store and the MLflow registry"):
            tag = save_registered(run, lambda: save_version(
                model_name, booster, serving, metadata, labels,
                write_extra=write_extras,
            ))  # fmt: skip
        log.info("saved %s", tag)
    log.info("time and peak memory by stage:\n%s", stages.summary())
    return TrainResult(tag, metrics, stages.timings, metadata, champion_metrics, evaluation, test,
                       peak_rss_mb=stages.peak_rss_mb)  # fmt: skip
