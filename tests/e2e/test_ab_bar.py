"""The A/B bar of issue 17: split mode with a challenger trained with shuffled labels (a
deliberately bad model), users replayed after the temporal cutoff (bench/simulate.py), the
impressions and events exported to the event log, and `models ab-report` over it: it calls
the challenger worse, with a CI that excludes 0, once the minimum sample is reached (and
says 'not enough data to decide' on the first few steps).

The replay of this small data set reaches about 45 users per arm: enough to detect a halving
of CTR (the effect asked for here, `--min-effect 0.5`), not the default 10% change (about 220
users per arm), for which the report refuses to decide."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.simulate import replay_split, simulate
from models.serving.event_log import EventLogExporter, read_event_log, read_impressions
from models.serving.online import OnlineLimits
from models.serving.online.sqlite import SqliteState
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, small_synthetic, start_server
from training.ab_report import build_report
from training.pipeline import TrainConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
HALVING = 0.5  # the relative change to detect: a model that halves CTR


def test_a_shuffled_labels_challenger_is_reported_worse(bentoml_home: Path, tmp_path: Path) -> None:
    base, replay = replay_split(small_synthetic(seed=11))
    champion = train(base, TrainConfig(tune_budget_s=0), model_name="ab-bar").tag
    challenger = train(base, TrainConfig(tune_budget_s=0, shuffle_labels=True), model_name="ab-bar").tag
    assert champion and challenger
    state_path = tmp_path / "state.sqlite3"
    server = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": champion, "RECSYS_CHALLENGER_TAG": challenger,
        "RECSYS_CHALLENGER_MODE": "split", "RECSYS_CHALLENGER_SHARE": "0.5", "RECSYS_ONLINE_PATH": str(state_path),
        "RECSYS_MONITOR_SAMPLE": "0", "RECSYS_REQUEST_LOG_SAMPLE": "0",
    })  # fmt: skip
    try:
        result = simulate(server.url, replay, rate=500, duration_s=240, k=10)
    finally:
        server.stop()
    assert not result.failed, result.failed
    assert {s.variant for s in result.steps} == {"champion", "challenger"}
    s = RecsysSettings()
    limits = OnlineLimits(s.online_max_items, s.online_retention_s, s.online_journal_s, s.online_timeout_s)
    state = SqliteState(state_path, limits)
    log = str(tmp_path / "log")
    try:
        EventLogExporter(state, log, batch_size=10_000).export()
    finally:
        state.close()
    events, impressions = read_event_log(log), read_impressions(log)
    assert len(impressions) == len(result.steps)

    def report(n_impressions: int, min_effect: float = HALVING):  # type: ignore[no-untyped-def]
        early = impressions.iloc[:n_impressions]
        return build_report(events[events["ts"] <= early["ts"].max() + 1], early, champion=champion,
                            challenger=challenger, k=10, window_s=s.outcome_window_s, min_effect=min_effect,
                            alpha=s.ab_alpha, power=s.ab_power)  # fmt: skip

    full = report(len(impressions))
    ctr = next(c for c in full.comparisons if c.metric == "ctr")
    print(result.summary().to_string(index=False), "\n", ctr)
    assert full.verdict == "challenger worse", ctr
    assert ctr.ci_high < 0 and ctr.min_users is not None and min(ctr.users) >= ctr.min_users
    assert report(20).verdict == "not enough data to decide"
    default = next(c for c in report(len(impressions), s.ab_min_effect).comparisons if c.metric == "ctr")
    assert default.min_users is not None and default.min_users > ctr.min_users
    if min(default.users) < default.min_users:
        assert default.verdict == "not enough data to decide", default
