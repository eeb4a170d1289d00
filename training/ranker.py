"""The XGBoost ranker: its parameters, and two ways to fit it on labelled groups with early
stopping on the validation groups. `fit_ranker` goes through the scikit-learn wrapper (one
fit); `RankingData` builds the quantised matrices once and `fit_booster` trains on them,
for the many fits of tuning (training/tuning.py). Both give the same booster for the same
parameters (tests/unit/test_tuning.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb
from tqdm import tqdm

from models.core.metrics import ranking_metrics
from training.groups import Groups, best_rounds

# What the scikit-learn wrapper consumes itself instead of handing to the booster.
_WRAPPER_ONLY = ("n_estimators", "early_stopping_rounds")


@dataclass(frozen=True)
class RankerParams:
    """XGBRanker parameters. Shallow, regularised trees: with a few hundred labelled users
    the ranker overfits otherwise. These are the base of the search of training/tuning.py,
    its first trial."""

    objective: str = "rank:ndcg"
    n_estimators: int = 400
    learning_rate: float = 0.05
    max_depth: int = 4
    min_child_weight: float = 20.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 10.0
    lambdarank_pair_method: str = "topk"
    lambdarank_num_pair_per_sample: int = 8
    early_stopping_rounds: int = 50
    # Histogram bins per feature. 256 (XGBoost's default, one byte per quantised value in
    # the QuantileDMatrix) is kept on purpose: the rank features take up to RANK_NONE + 1
    # distinct values and the scores are continuous, so fewer bins merge ranks the ranker
    # separates; the fit's cost grows with the rows far more than with the bins.
    max_bin: int = 256


def ranker_kwargs(params: RankerParams, k: int, seed: int) -> dict[str, Any]:
    """XGBRanker parameters, shared by the in-process and the Dask engine."""
    return {
        "objective": params.objective,
        "n_estimators": params.n_estimators,
        "learning_rate": params.learning_rate,
        "max_depth": params.max_depth,
        "min_child_weight": params.min_child_weight,
        "subsample": params.subsample,
        "colsample_bytree": params.colsample_bytree,
        "reg_lambda": params.reg_lambda,
        "lambdarank_pair_method": params.lambdarank_pair_method,
        "lambdarank_num_pair_per_sample": params.lambdarank_num_pair_per_sample,
        "early_stopping_rounds": params.early_stopping_rounds,
        "eval_metric": f"ndcg@{k}",
        "tree_method": "hist",
        "max_bin": params.max_bin,
        "random_state": seed,
    }


def resolve_threads(nthread: int) -> int:
    """The threads to give XGBoost: `nthread`, or for 0 the cores this process may use
    (set explicitly: XGBoost's own default can oversubscribe a shared machine's cores)."""
    if nthread < 0:
        raise ValueError(f"nthread must be >= 0 (0: every usable core), got {nthread}")
    if nthread:
        return nthread
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Rows handed to XGBoost per batch when it quantises the training groups: the raw float32
# rows of one batch are the only copy of the data besides the groups themselves.
BATCH_ROWS = 1_000_000


class GroupBatches(xgb.DataIter):
    """The groups of a `Groups` in batches of about BATCH_ROWS rows, for a QuantileDMatrix
    built from an iterator: XGBoost quantises batch by batch, so the training matrix is
    never one dense float copy of every row (it keeps one byte per value instead)."""

    def __init__(self, groups: Groups, batch_rows: int = BATCH_ROWS) -> None:
        if not len(groups):
            raise ValueError("GroupBatches: no groups to iterate")
        sizes = np.array([len(y) for y in groups.labels])
        cuts = np.searchsorted(np.cumsum(sizes), np.arange(batch_rows, sizes.sum(), batch_rows), side="right")
        self._bounds = [int(b) for b in np.unique(np.r_[0, cuts, len(sizes)])]
        self._groups = groups
        self._batch = 0
        super().__init__()

    def next(self, input_data: Callable[..., None]) -> bool:
        if self._batch >= len(self._bounds) - 1:
            return False
        lo, hi = self._bounds[self._batch], self._bounds[self._batch + 1]
        g = self._groups
        input_data(data=np.vstack(g.features[lo:hi]), label=np.concatenate(g.labels[lo:hi]),
                   qid=np.concatenate(g.qid[lo:hi]))  # fmt: skip
        self._batch += 1
        return True

    def reset(self) -> None:
        self._batch = 0


class BoostingProgress(xgb.callback.TrainingCallback):
    """A tqdm bar over the boosting rounds with the latest validation metric (the bar
    is off when stderr is not a terminal, as everywhere in training)."""

    def __init__(self, total: int, metric: str, desc: str = "boosting") -> None:
        self.total, self.metric, self.desc = total, metric, desc
        self.bar: tqdm | None = None
        super().__init__()

    def before_training(self, model: xgb.Booster) -> xgb.Booster:
        self.bar = tqdm(total=self.total, desc=self.desc, leave=False, disable=None)
        return model

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict[str, Any]) -> bool:
        assert self.bar is not None
        scores = next(iter(evals_log.values()), {}).get(self.metric, [])
        if scores:
            self.bar.set_postfix({f"valid {self.metric}": f"{float(scores[-1]):.4f}"}, refresh=False)
        self.bar.update(1)
        return False

    def after_training(self, model: xgb.Booster) -> xgb.Booster:
        if self.bar is not None:
            self.bar.close()
        return model


def fit_ranker(
    train: Groups, valid: Groups, params: RankerParams, k: int, seed: int, nthread: int = 0
) -> tuple[xgb.Booster, list[float], int]:
    """(booster up to the best validation round, validation NDCG@k curve, best round),
    through the scikit-learn wrapper. `nthread` 0: all cores."""
    x, y, qid = train.arrays()
    xv, yv, qv = valid.arrays()
    ranker = xgb.XGBRanker(**ranker_kwargs(params, k, seed), n_jobs=resolve_threads(nthread))
    ranker.fit(x, y, qid=qid, eval_set=[(xv, yv)], eval_qid=[qv], verbose=False)
    return best_rounds(ranker, k)


class RankingData:
    """The training and validation groups as XGBoost matrices, built once and reused by
    every fit. The same matrices as XGBRanker.fit builds (a QuantileDMatrix for training,
    the validation one quantised on its cuts), so a fit here equals a fit there."""

    def __init__(self, train: Groups, valid: Groups, nthread: int = 0, max_bin: int = RankerParams.max_bin) -> None:
        xv, yv, qv = valid.arrays()
        train.arrays_check()
        self.nthread = resolve_threads(nthread)
        self.max_bin = max_bin
        self.train = xgb.QuantileDMatrix(GroupBatches(train), nthread=self.nthread, max_bin=max_bin)
        self.valid = xgb.QuantileDMatrix(xv, label=yv, qid=qv, ref=self.train, nthread=self.nthread,
                                         max_bin=max_bin)  # fmt: skip
        self.n_rows = int(self.train.num_row())
        self.rows_per_group = self.n_rows / len(train)
        # Kept to score a booster group by group (the paired comparison of tuning).
        self.valid_x, self.valid_y = xv, yv
        self.valid_bounds = np.flatnonzero(np.r_[True, qv[1:] != qv[:-1], True])

    def valid_group_ndcg(self, booster: xgb.Booster, k: int) -> np.ndarray:
        """NDCG@k of `booster` on each validation group (binary labels, as models/core/metrics)."""
        scores = booster.inplace_predict(self.valid_x)
        out = np.empty(len(self.valid_bounds) - 1)
        for g, (lo, hi) in enumerate(itertools.pairwise(self.valid_bounds)):
            order = np.argsort(-scores[lo:hi], kind="stable")
            out[g] = ranking_metrics(order, np.flatnonzero(self.valid_y[lo:hi]), k)["ndcg"]
        return out


@dataclass(frozen=True)
class Fitted:
    """A fit of `params` on `data`, kept for the stage after it (tuning's first trial is the
    row search's last fit: the same groups, parameters and seed give the same booster)."""

    data: RankingData
    params: RankerParams
    booster: xgb.Booster
    curve: list[float]
    best_round: int
    seconds: float


def fit_booster(
    data: RankingData, params: RankerParams, k: int, seed: int
) -> tuple[xgb.Booster, list[float], int]:
    """(booster up to the best validation round, validation NDCG@k curve, best round), on
    matrices built once: what `fit_ranker` gives, without building them again."""
    kwargs = ranker_kwargs(params, k, seed)
    booster_params = {key: value for key, value in kwargs.items() if key not in _WRAPPER_ONLY}
    booster_params["nthread"] = data.nthread
    if params.max_bin != data.max_bin:
        raise ValueError(f"RankerParams.max_bin {params.max_bin} differs from the matrices' {data.max_bin}")
    history: dict[str, dict[str, list[float]]] = {}
    booster = xgb.train(
        booster_params, data.train, num_boost_round=params.n_estimators,
        evals=[(data.valid, "validation_0")], early_stopping_rounds=params.early_stopping_rounds,
        evals_result=history, verbose_eval=False,
        callbacks=[BoostingProgress(params.n_estimators, f"ndcg@{k}")],
    )  # fmt: skip
    curve = [float(v) for v in history["validation_0"][f"ndcg@{k}"]]
    best = int(booster.best_iteration)
    return booster[: best + 1], curve, best
