"""The XGBoost ranker: its parameters, and two ways to fit it on labelled groups with early
stopping on the validation groups. `fit_ranker` goes through the scikit-learn wrapper (one
fit); `RankingData` builds the quantised matrices once and `fit_booster` trains on them,
for the many fits of tuning (training/tuning.py). Both give the same booster for the same
parameters (tests/unit/test_tuning.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

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
        "random_state": seed,
    }


def fit_ranker(
    train: Groups, valid: Groups, params: RankerParams, k: int, seed: int, nthread: int = 0
) -> tuple[xgb.Booster, list[float], int]:
    """(booster up to the best validation round, validation NDCG@k curve, best round),
    through the scikit-learn wrapper. `nthread` 0: all cores."""
    x, y, qid = train.arrays()
    xv, yv, qv = valid.arrays()
    ranker = xgb.XGBRanker(**ranker_kwargs(params, k, seed), n_jobs=nthread or None)
    ranker.fit(x, y, qid=qid, eval_set=[(xv, yv)], eval_qid=[qv], verbose=False)
    return best_rounds(ranker, k)


class RankingData:
    """The training and validation groups as XGBoost matrices, built once and reused by
    every fit. The same matrices as XGBRanker.fit builds (a QuantileDMatrix for training,
    the validation one quantised on its cuts), so a fit here equals a fit there."""

    def __init__(self, train: Groups, valid: Groups, nthread: int = 0) -> None:
        x, y, qid = train.arrays()
        xv, yv, qv = valid.arrays()
        threads = nthread or None
        self.nthread = nthread
        self.train = xgb.QuantileDMatrix(x, label=y, qid=qid, nthread=threads)
        self.valid = xgb.QuantileDMatrix(xv, label=yv, qid=qv, ref=self.train, nthread=threads)
        self.rows_per_group = len(y) / len(train)
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


def fit_booster(
    data: RankingData, params: RankerParams, k: int, seed: int
) -> tuple[xgb.Booster, list[float], int]:
    """(booster up to the best validation round, validation NDCG@k curve, best round), on
    matrices built once: what `fit_ranker` gives, without building them again."""
    kwargs = ranker_kwargs(params, k, seed)
    booster_params = {key: value for key, value in kwargs.items() if key not in _WRAPPER_ONLY}
    if data.nthread:
        booster_params["nthread"] = data.nthread
    history: dict[str, dict[str, list[float]]] = {}
    booster = xgb.train(
        booster_params, data.train, num_boost_round=params.n_estimators,
        evals=[(data.valid, "validation_0")], early_stopping_rounds=params.early_stopping_rounds,
        evals_result=history, verbose_eval=False,
    )  # fmt: skip
    curve = [float(v) for v in history["validation_0"][f"ndcg@{k}"]]
    best = int(booster.best_iteration)
    return booster[: best + 1], curve, best
