"""The ranker's hyperparameters, chosen on the validation groups of each training run: the
base parameters first, then seeded random trials until a time budget is spent, each with
early stopping on the validation groups. The trial with the best validation NDCG@k replaces
the base only if its gain is more than the noise of a few hundred validation groups: a
paired test over the groups, corrected for the number of trials (the best of many noisy
scores is high by chance: on MovieLens-small, top trials that won on validation by 0.001 to
0.012 scored lower than the base on the test slice in 2 seeds of 3).

The ranges are relative to the data where the data sets the scale (min_child_weight to the
rows of a group, the number of pairs to k and to the group size), so nothing here is tuned
to one data set. Trial i's parameters depend on the seed and i only, never on what earlier
trials scored or how long they took: the same seed gives the same sequence, and a larger
budget only adds trials at its end.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import xgboost as xgb

from training.groups import Groups
from training.ranker import Fitted, RankerParams, RankingData, fit_booster

log = logging.getLogger("training")

# Defaults of TrainConfig. 30 s: a trial takes 1.5 to 4 s on MovieLens-small on 2 quiet
# cores, so 10 to 20 trials; training (retrieval choice and EASE included) stays well within
# 3 minutes, and the default `make serve` (which gives 10 s) within its 3 minutes to /readyz. 60 trials: random search's usual size (each trial has a 5% chance of
# the top 5% of the space, so 60 reach it with 95%); tiny data sets stop there, not at the budget.
DEFAULT_TUNE_BUDGET_S = 30.0
DEFAULT_TUNE_MAX_TRIALS = 60

# The chance, over all the random trials of a run, that noise alone replaces the base.
DEFAULT_SIGNIFICANCE = 0.05

# The search space: (low, high) of each drawn parameter. min_child_weight is a share of
# the rows of one group (a leaf must hold that much hessian); the pairs per row a multiple of k.
MAX_DEPTH = (2, 8)
LEARNING_RATE = (0.02, 0.3)  # log-uniform
MIN_CHILD_WEIGHT_PER_GROUP_ROW = (0.01, 1.0)  # log-uniform, times rows per group
REG_LAMBDA = (0.1, 100.0)  # log-uniform
SUBSAMPLE = (0.5, 1.0)
COLSAMPLE_BYTREE = (0.5, 1.0)
PAIRS_PER_K = (0.5, 4.0)  # log-uniform, times k (topk: the truncation, near the k evaluated), at most the rows of a group


@dataclass(frozen=True)
class TuneResult:
    """The chosen trial: its parameters, validation NDCG@k, best round, the booster (up to
    that round) and its validation curve; every trial as a plain dict (`params`, `score`,
    `rounds`, `trained_rounds`, `seconds`), the base parameters first; the trial with the top
    validation score and its paired gain over the base (`gain`: mean, standard error, the
    z it had to pass, or None when the top trial is the base)."""

    params: RankerParams
    score: float
    best_round: int
    chosen_trial: int
    booster: xgb.Booster
    curve: list[float]
    trials: list[dict[str, Any]]
    top_trial: int
    gain: dict[str, float] | None
    budget_s: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        """What a version's metadata keeps of the search (no booster, no None values)."""
        out = {
            "budget_s": self.budget_s, "seconds": round(self.seconds, 3), "n_trials": len(self.trials),
            "chosen_trial": self.chosen_trial, "top_trial": self.top_trial, "score": self.score,
            "base_score": self.trials[0]["score"], "trials": self.trials,
        }  # fmt: skip
        if self.gain is not None:
            out["gain_over_base"] = self.gain
        return out


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_params(
    rng: np.random.Generator, base: RankerParams, rows_per_group: float, k: int
) -> RankerParams:
    """One random point of the search space around `base` (whose objective, pair method,
    round cap and early stopping stay). Always the same number of draws, in the same order."""
    depth = int(rng.integers(MAX_DEPTH[0], MAX_DEPTH[1] + 1))
    learning_rate = _log_uniform(rng, *LEARNING_RATE)
    min_child_weight = rows_per_group * _log_uniform(rng, *MIN_CHILD_WEIGHT_PER_GROUP_ROW)
    reg_lambda = _log_uniform(rng, *REG_LAMBDA)
    subsample = float(rng.uniform(*SUBSAMPLE))
    colsample = float(rng.uniform(*COLSAMPLE_BYTREE))
    pairs = round(k * _log_uniform(rng, *PAIRS_PER_K))
    return replace(
        base, max_depth=depth, learning_rate=round(learning_rate, 5),
        min_child_weight=round(min_child_weight, 3), reg_lambda=round(reg_lambda, 4),
        subsample=round(subsample, 3), colsample_bytree=round(colsample, 3),
        lambdarank_num_pair_per_sample=int(min(max(pairs, 1), max(rows_per_group, 1))),
    )  # fmt: skip


def paired_gain(gain: np.ndarray, n_random_trials: int, significance: float) -> dict[str, float]:
    """Mean and standard error of per-group gains (at least 2 groups), and the z the mean
    must pass: one-sided at `significance`, Bonferroni-corrected for `n_random_trials`
    (`significance` 1: z 0, no test)."""
    se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    level = significance / max(n_random_trials, 1)
    z = 0.0 if significance >= 1 else statistics.NormalDist().inv_cdf(1 - level)
    return {"mean": float(gain.mean()), "se": se, "z": z}


def tune_ranker(
    train: Groups, valid: Groups, base: RankerParams, k: int, budget_s: float, seed: int,
    nthread: int = 0, max_trials: int | None = None, significance: float = DEFAULT_SIGNIFICANCE,
    base_fit: Fitted | None = None,
) -> TuneResult:
    """Fit `base`, then random trials drawn with `seed`, while less than `budget_s` seconds
    have passed since the start (the first trial always runs; a trial under way is never cut,
    so the wall time is at most the budget plus one trial) and, if given, fewer than
    `max_trials` have run. Every fit uses the XGBoost `seed` too and stops early on the
    validation groups. The top-scoring trial (the earlier of equals) is chosen if it is the
    base or its paired gain over the base passes the test of `paired_gain`; else the base.
    `significance` 1 always chooses the top trial. `base_fit`: the base's fit on these very
    groups, done already: its matrices are reused, it is the first trial, and its seconds
    count in the budget as if it had run here."""
    if budget_s < 0 or not math.isfinite(budget_s):
        raise ValueError(f"tune budget_s must be a finite number >= 0, got {budget_s!r}")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"tune max_trials must be >= 1 or None, got {max_trials!r}")
    if not 0 < significance <= 1:
        raise ValueError(f"tune significance must be in (0, 1], got {significance!r}")
    if len(valid) < 2:
        raise ValueError(f"tune needs at least 2 validation groups, got {len(valid)}")
    if base_fit is not None and base_fit.params != base:
        raise ValueError(f"tune base_fit is a fit of {base_fit.params}, not of the base {base}")
    # The budget counts from the base's fit, done before or here.
    start = time.perf_counter() - (base_fit.seconds if base_fit is not None else 0.0)
    data = RankingData(train, valid, nthread, base.max_bin) if base_fit is None else base_fit.data
    rng = np.random.default_rng(seed)
    trials: list[dict[str, Any]] = []
    fits: dict[int, tuple[xgb.Booster, list[float], int]] = {}  # the base's and the top trial's
    top = 0
    params = base
    while True:
        began = time.perf_counter()
        if not trials and base_fit is not None:
            booster, curve, best_round = base_fit.booster, base_fit.curve, base_fit.best_round
            seconds = base_fit.seconds
        else:
            booster, curve, best_round = fit_booster(data, params, k, seed)
            seconds = time.perf_counter() - began
        score = curve[best_round]
        trials.append({
            "params": asdict(params), "score": score, "rounds": best_round + 1,
            "trained_rounds": len(curve), "seconds": round(seconds, 3),
        })  # fmt: skip
        index = len(trials) - 1
        log.debug("trial %d: ndcg@%d %.4f at round %d (%s)", index, k, score, best_round, params)
        if index == 0 or score > trials[top]["score"]:
            fits = {i: fit for i, fit in fits.items() if i == 0}
            fits[index], top = (booster, curve, best_round), index
        if time.perf_counter() - start >= budget_s or (max_trials is not None and len(trials) >= max_trials):
            break
        params = sample_params(rng, base, data.rows_per_group, k)
    chosen, gain = 0, None
    if top != 0:
        gain = paired_gain(data.valid_group_ndcg(fits[top][0], k) - data.valid_group_ndcg(fits[0][0], k),
                           len(trials) - 1, significance)  # fmt: skip
        chosen = top if significance >= 1 or gain["mean"] > gain["z"] * gain["se"] else 0
    booster, curve, best_round = fits[chosen]
    seconds = time.perf_counter() - start
    log.info("tuning: %d trials in %.1f s; trial %d chosen, validation ndcg@%d %.4f (base %.4f, top trial %d: %.4f)",
             len(trials), seconds, chosen, k, trials[chosen]["score"], trials[0]["score"], top,
             trials[top]["score"])  # fmt: skip
    return TuneResult(RankerParams(**trials[chosen]["params"]), trials[chosen]["score"], best_round, chosen,
                      booster, curve, trials, top, gain, budget_s, seconds)  # fmt: skip
