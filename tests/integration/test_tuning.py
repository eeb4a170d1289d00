"""The ranker's tuning on validation groups of the small synthetic data: the base first, the
top trial chosen when its gain is more than noise (and a poor base replaced), the budget
kept, the same seed the same trials, and fits on the shared matrices equal to the
scikit-learn wrapper's."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict
from pathlib import Path

import bentoml
import numpy as np
import pytest

from tests.helpers import small_synthetic
from training.groups import Groups, collect_groups
from training.pipeline import TrainConfig, train, window_tables
from training.ranker import Fitted, RankerParams, RankingData, fit_booster, fit_ranker
from training.split import SplitConfig, window
from training.tuning import DEFAULT_SIGNIFICANCE, TuneResult, sample_params, tune_ranker

K = 10
SEED = 42
# Fewer rounds than the default: these tests are about the search, not the model.
BASE = dataclasses.replace(RankerParams(), n_estimators=60, early_stopping_rounds=10)


@pytest.fixture(scope="module")
def groups() -> tuple[Groups, Groups]:
    """The labelled training and validation groups the pipeline would fit on. The per-user
    split gives many groups on small data, which the tests of the search want (with the
    temporal split's few, an unsplittable base's tie order, the candidates' own, is hard
    to beat by more than noise)."""
    dataset, config = small_synthetic(), TrainConfig(split=SplitConfig(kind="per_user"))
    eval_users = np.random.default_rng(config.seed).random(dataset.log.n_users) < config.eval_user_frac
    train, valid = Groups(), Groups()
    for w in range(1, config.n_windows + 1):
        win = window(dataset.log, w, config.split)
        tables = window_tables(win, dataset, dataset.catalog.genre_names(), config.candidates)
        collect_groups(tables, win, config.candidates, eval_users, train, valid, qid_base=w * dataset.log.n_users)
    assert len(train) >= 10 and len(valid) >= 2
    return train, valid


def tune(groups: tuple[Groups, Groups], budget_s: float, seed: int = SEED, max_trials: int | None = None,
         base: RankerParams = BASE, significance: float = DEFAULT_SIGNIFICANCE) -> TuneResult:  # fmt: skip
    return tune_ranker(*groups, base, K, budget_s, seed, nthread=1, max_trials=max_trials, significance=significance)


@pytest.fixture(scope="module")
def five_trials(groups: tuple[Groups, Groups]) -> TuneResult:
    """No test of the gain: the top trial is chosen."""
    return tune(groups, budget_s=3600, max_trials=5, significance=1.0)


@pytest.mark.parametrize("draw", [0, 1, 2], ids=["base", "random-1", "random-2"])
def test_a_fit_on_the_shared_matrices_equals_the_sklearn_fit(groups: tuple[Groups, Groups], draw: int) -> None:
    data = RankingData(*groups, nthread=1)
    rng = np.random.default_rng(draw)
    params = BASE if draw == 0 else sample_params(rng, BASE, data.rows_per_group, K)
    shared, shared_curve, shared_best = fit_booster(data, params, K, SEED)
    sklearn, sklearn_curve, sklearn_best = fit_ranker(*groups, params, K, SEED, nthread=1)
    assert (shared_curve, shared_best) == (sklearn_curve, sklearn_best)
    x, _, _ = groups[1].arrays()
    np.testing.assert_array_equal(shared.inplace_predict(x), sklearn.inplace_predict(x))


def test_a_base_fit_done_before_is_the_first_trial_and_changes_nothing_else(
    groups: tuple[Groups, Groups], five_trials: TuneResult
) -> None:
    data = RankingData(*groups, nthread=1)
    booster, curve, best = fit_booster(data, BASE, K, SEED)
    reused = tune_ranker(*groups, BASE, K, 3600, SEED, nthread=1, max_trials=5, significance=1.0,
                         base_fit=Fitted(data, BASE, booster, curve, best, 0.0))  # fmt: skip
    assert [t["score"] for t in reused.trials] == [t["score"] for t in five_trials.trials]
    assert reused.trials[0]["seconds"] == 0.0  # not fitted again
    assert (reused.chosen_trial, reused.best_round) == (five_trials.chosen_trial, five_trials.best_round)
    spent = tune_ranker(*groups, BASE, K, 3600, SEED, nthread=1,
                        base_fit=Fitted(data, BASE, booster, curve, best, 7200.0))  # fmt: skip
    assert len(spent.trials) == 1  # the base's own seconds count in the budget
    with pytest.raises(ValueError, match="base_fit is a fit of"):
        other = dataclasses.replace(BASE, max_depth=2)
        tune_ranker(*groups, BASE, K, 0, SEED, nthread=1, base_fit=Fitted(data, other, booster, curve, best, 0.0))


def test_a_budget_of_zero_fits_the_base_parameters_only(groups: tuple[Groups, Groups]) -> None:
    result = tune(groups, budget_s=0)
    assert len(result.trials) == 1
    assert result.params == BASE and result.trials[0]["params"] == asdict(BASE)
    assert result.score == result.trials[0]["score"] == result.curve[result.best_round]


def test_the_base_is_the_first_trial_and_the_top_trial_is_chosen(five_trials: TuneResult) -> None:
    trials = five_trials.trials
    assert len(trials) == 5
    assert trials[0]["params"] == asdict(BASE)
    assert len({str(t["params"]) for t in trials}) == 5  # the others are drawn, all different
    scores = [t["score"] for t in trials]
    top = int(np.argmax(scores))  # the first of equal scores: the base wins ties
    assert (five_trials.top_trial, five_trials.chosen_trial, five_trials.score) == (top, top, max(scores))
    assert asdict(five_trials.params) == trials[top]["params"]
    assert five_trials.best_round + 1 == trials[top]["rounds"] == len(five_trials.booster.get_dump())
    assert five_trials.score >= trials[0]["score"]
    assert five_trials.summary()["trials"] == trials


def test_the_top_trial_replaces_the_base_only_with_a_gain_beyond_noise(groups: tuple[Groups, Groups]) -> None:
    result = tune(groups, budget_s=3600, max_trials=5)
    assert result.trials[0]["params"] == asdict(BASE)
    assert result.top_trial == int(np.argmax([t["score"] for t in result.trials]))
    if result.top_trial == 0:
        assert result.chosen_trial == 0 and result.gain is None
        return
    assert result.gain is not None and result.gain["z"] > 2  # one-sided 5%, over 4 random trials
    passes = result.gain["mean"] > result.gain["z"] * result.gain["se"]
    assert result.chosen_trial == (result.top_trial if passes else 0)
    assert asdict(result.params) == result.trials[result.chosen_trial]["params"]
    # The gain is the difference of the validation scores, computed group by group.
    top, base = result.trials[result.top_trial]["score"], result.trials[0]["score"]
    assert result.gain["mean"] == pytest.approx(top - base, abs=1e-3)


def test_a_poor_base_is_replaced(groups: tuple[Groups, Groups]) -> None:
    """A base that cannot split (every leaf needs more hessian than the data has) ranks in
    no order; the search finds better, by far more than noise."""
    poor = dataclasses.replace(BASE, min_child_weight=1e9)
    result = tune(groups, budget_s=3600, max_trials=3, base=poor)
    assert result.chosen_trial != 0 and result.params != poor
    assert result.score > result.trials[0]["score"] + 0.05


def test_the_same_seed_gives_the_same_trials(groups: tuple[Groups, Groups], five_trials: TuneResult) -> None:
    def without_time(result: TuneResult) -> list[dict[str, object]]:
        return [{key: value for key, value in t.items() if key != "seconds"} for t in result.trials]

    again = tune(groups, budget_s=3600, max_trials=5, significance=1.0)
    assert without_time(again) == without_time(five_trials)
    assert again.chosen_trial == five_trials.chosen_trial
    other = tune(groups, budget_s=3600, seed=SEED + 1, max_trials=5, significance=1.0)
    assert [t["params"] for t in other.trials[1:]] != [t["params"] for t in five_trials.trials[1:]]


def test_the_budget_bounds_the_wall_time(groups: tuple[Groups, Groups]) -> None:
    # The budget counts from the start, matrices included: take three of the base's whole
    # runs, so that a loaded machine cannot spend it all before a second trial.
    budget = max(3 * tune(groups, budget_s=0).seconds, 2.0)
    start = time.perf_counter()
    result = tune(groups, budget_s=budget)
    wall = time.perf_counter() - start
    assert len(result.trials) >= 2  # the budget was used, not only the base
    # A trial starts only within the budget and is never cut: at most one trial beyond it
    # (plus the matrices, built once, and a margin for a shared machine, where one trial's
    # time varies by 2x between draws).
    assert wall <= budget + 2 * max(t["seconds"] for t in result.trials) + 2.0 + 0.5 * budget, (wall, budget)
    assert result.seconds <= wall


@pytest.mark.parametrize(
    ("change", "message"),
    [({"budget_s": -1.0}, "budget_s must be a finite number >= 0"),
     ({"budget_s": math.nan}, "budget_s must be a finite number >= 0"),
     ({"budget_s": math.inf}, "budget_s must be a finite number >= 0"),
     ({"max_trials": 0}, "max_trials must be >= 1"),
     ({"significance": 0.0}, r"significance must be in \(0, 1\]"),
     ({"significance": 1.5}, r"significance must be in \(0, 1\]")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_them(
    groups: tuple[Groups, Groups], change: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tune(groups, **{"budget_s": 0.0, **change})  # type: ignore[arg-type]


def test_the_trials_go_into_the_version_metadata(bentoml_home: Path) -> None:
    config = TrainConfig(ranker=BASE, tune_budget_s=3600, tune_max_trials=3, tune_significance=1.0)
    result = train(small_synthetic(), config, model_name="recsys-tuned")
    assert result.tag is not None
    meta = bentoml.models.get(result.tag).info.metadata
    tuning = meta["tuning"]
    assert tuning["n_trials"] == len(tuning["trials"]) == 3
    assert tuning["trials"][0]["params"] == asdict(config.ranker)
    chosen = tuning["trials"][tuning["chosen_trial"]]
    assert tuning["chosen_trial"] == int(np.argmax([t["score"] for t in tuning["trials"]]))
    assert meta["params"]["ranker"] == chosen["params"]
    assert meta["best_round"] + 1 == chosen["rounds"]
    assert max(meta["validation_ndcg_curve"]) == pytest.approx(chosen["score"])
