"""The closed loop's pure logic (training/loop.py): which triggers fire, what a staged
challenger's A/B verdict leads to, what the loop reads back from the registry's record, and
that a challenger the A/B report calls worse (a --shuffle-labels model) is never promoted."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.lifecycle.registry import Registry
from models.serving.settings import RecsysSettings
from training import loop
from training.ab_report import build_report
from training.loop import Observed, Triggers, fired, judge, last_retrain, loop_challenger, promoted_at

ALL = Triggers(min_new_events=100, drift_url="http://127.0.0.1:1", max_age_s=3600.0)
OFF = Triggers(None, None, None)


@pytest.mark.parametrize(
    ("triggers", "observed", "expected"),
    [
        (ALL, Observed(99, "ok", 10.0), []),
        (ALL, Observed(100, "ok", 10.0), ["new_events"]),
        (ALL, Observed(0, "alert", 10.0), ["drift"]),
        (ALL, Observed(0, "insufficient_data", 10.0), []),  # a PSI on a handful of rows is noise
        (ALL, Observed(0, "warn", 10.0), []),
        (ALL, Observed(0, None, 10.0), []),  # the service did not answer
        (ALL, Observed(0, "ok", 3601.0), ["max_age"]),
        (ALL, Observed(0, "ok", math.inf), ["max_age"]),  # its promotion fell out of the record
        (ALL, Observed(0, "ok", None), []),  # no champion: nothing ages
        (ALL, Observed(500, "alert", 7200.0), ["new_events", "drift", "max_age"]),
        (OFF, Observed(10**9, "alert", math.inf), []),
        (ALL, Observed(0, "alert", 7200.0, retrained=True), []),  # nothing new since the last retrain
        (ALL, Observed(1, "alert", 7200.0, retrained=True), ["drift", "max_age"]),
        (ALL, Observed(1, "alert", 10.0, retrained=True, drift_retried=True), []),  # one retrain did not fix it
        (ALL, Observed(0, "alert", 7200.0), ["drift", "max_age"]),  # the first retrain: the base data is new
    ],
    ids=["below-count", "count", "drift-alert", "insufficient", "warn", "no-answer", "old", "forgotten",
         "no-champion", "all", "all-off", "nothing-new", "something-new", "drift-retried", "first"],
)
def test_triggers(triggers: Triggers, observed: Observed, expected: list[str]) -> None:
    assert fired(triggers, observed) == expected


@pytest.mark.parametrize(
    ("verdict", "waited", "action"),
    [
        ("challenger worse", 10.0, "clear"),
        ("challenger worse", 0.0, "clear"),
        ("not enough data to decide", 10.0, "wait"),
        ("not enough data to decide", 101.0, "clear"),
        (None, 10.0, "wait"),  # no impressions of it yet
        (None, 101.0, "clear"),
        ("no difference detected", 10.0, "promote"),
        ("challenger better", 10.0, "promote"),
    ],
)
def test_judge(verdict: str | None, waited: float, action: str) -> None:
    assert judge(verdict, waited, max_wait_s=100.0)[0] == action


EVENTS: list[dict[str, Any]] = [
    {"at": "2026-01-01T00:00:00+00:00", "action": "promote", "stage": "champion", "tag": "m:a", "reason": "first version"},
    {"at": "2026-01-01T01:00:00+00:00", "action": "loop", "decision": "retrain", "events_until": 100.0},
    {"at": "2026-01-01T01:00:01+00:00", "action": "promote", "stage": "challenger", "tag": "m:b", "reason": "loop"},
    {"at": "2026-01-01T02:00:00+00:00", "action": "loop", "decision": "retrain", "events_until": 250.0},
    {"at": "2026-01-01T02:00:01+00:00", "action": "promote", "stage": "challenger", "tag": "m:c", "reason": "manual"},
]  # fmt: skip


def test_what_the_loop_reads_back_from_the_record() -> None:
    last = last_retrain(EVENTS)
    assert last is not None and last["events_until"] == 250.0
    assert last_retrain(EVENTS[:1]) is None
    assert promoted_at(EVENTS, "m:a", "champion") == "2026-01-01T00:00:00+00:00"
    assert promoted_at(EVENTS, "m:a", "challenger") is None


@pytest.mark.parametrize(("challenger", "mine"), [("m:b", "m:b"), ("m:c", None), (None, None)])
def test_the_loop_judges_only_its_own_challenger(challenger: str | None, mine: str | None) -> None:
    assert loop_challenger(Registry("m", "m:a", challenger, [], EVENTS)) == mine


def _traffic(ctr: dict[str, float], users: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One impression per user and version, clicked (the first item) with the version's CTR."""
    rng = np.random.default_rng(seed)
    imps, evs = [], []
    for version, rate in ctr.items():
        variant = "champion" if version == "m:a" else "challenger"
        for u in range(users):
            rid = f"{version}-{u}"
            imps.append({"recommendation_id": rid, "user_id": f"{variant}-{u}", "items": ["x", "y"],
                         "model_version": version, "variant": variant, "ts": 1000.0 + u})  # fmt: skip
            if rng.random() < rate:
                evs.append({"event_id": f"e-{rid}", "user_id": f"{variant}-{u}", "item_id": "x", "type": "click",
                            "ts": 1000.5 + u, "value": np.nan, "recommendation_id": rid})  # fmt: skip
    return pd.DataFrame(evs), pd.DataFrame(imps)


@pytest.mark.parametrize(("challenger_ctr", "action"), [(0.1, "clear"), (0.5, "promote")], ids=["worse", "level"])
def test_a_challenger_the_report_calls_worse_is_cleared_never_promoted(
    monkeypatch: pytest.MonkeyPatch, challenger_ctr: float, action: str
) -> None:
    """The loop's decision over a real A/B report: a challenger that halves CTR and worse (what a
    --shuffle-labels model does, tests/e2e/test_ab_bar.py) is cleared; a level one is promoted."""
    events, impressions = _traffic({"m:a": 0.5, "m:b": challenger_ctr}, users=400)
    s = RecsysSettings(ab_min_effect=0.5)
    report = build_report(events, impressions, champion="m:a", challenger="m:b", k=10, window_s=60, min_effect=0.5,
                          alpha=s.ab_alpha, power=s.ab_power)  # fmt: skip
    if action == "clear":
        assert report.verdict == "challenger worse"
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(loop, "read_event_log", lambda _: events)
    monkeypatch.setattr(loop, "read_impressions", lambda _: impressions)
    monkeypatch.setattr(loop.registry, "promote", lambda tag, stage, **kw: calls.append(("promote", (tag, stage))))
    monkeypatch.setattr(loop.registry, "clear_challenger", lambda name, reason: calls.append(("clear", name)))
    monkeypatch.setattr(loop.registry, "record", lambda name, event: calls.append(("record", event)))
    cfg = loop.LoopConfig("m", "unused", OFF, "online", 3600.0, 0.005, s, argparse.Namespace())
    decision = loop.judge_challenger(cfg, Registry("m", "m:a", "m:b", [], EVENTS), "m:b", now=0.0)
    assert decision["decision"] == f"challenger_{action}"
    assert [c[0] for c in calls] == [action, "record"]
    if action == "clear":
        assert decision["ab"]["verdict"] == "challenger worse" and decision["ab"]["primary"]["ci_high"] < 0
    else:
        assert calls[0][1] == ("m:b", "champion")
