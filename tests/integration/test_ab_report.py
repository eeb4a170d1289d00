"""`python -m training models ab-report` on a real event log: impressions and clicks go
through the online state and the exporter to Parquet; the report calls a clearly worse
challenger worse (CI excluding 0) only once the minimum sample is reached, and says 'not
enough data to decide' before."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from models.serving.event_log import EventLogExporter
from models.serving.events import Event, Impression
from models.serving.online import OnlineLimits
from models.serving.online.sqlite import SqliteState
from training.__main__ import main as training_main

LIMITS = OnlineLimits(max_items=50, retention_s=1e9, journal_s=1e9, timeout_s=5)
CHAMPION, CHALLENGER = "recsys-ranker:champ", "recsys-ranker:chall"


def simulated_log(path: Path, n_users: int, rates: dict[str, float], seed: int) -> str:
    """Each user sees 3 responses of 10 items from its arm; a response is clicked (at a random
    position, some clicks without a recommendation_id: the attribution window's part) with
    the arm's rate. Before the split, the champion alone served (must not count)."""
    rng = np.random.default_rng(seed)
    state = SqliteState(path / "state.sqlite3", LIMITS)
    impressions, events = [], []
    t = 1_700_000_000.0
    for u in range(5):  # before the split: the champion alone, all clicked
        rid = uuid.uuid4().hex
        impressions.append(Impression(rid, f"early{u}", tuple(f"i{j}" for j in range(10)), CHAMPION, "champion", t))
        events.append(Event(uuid.uuid4().hex, f"early{u}", "i0", "click", t + 1, None, rid))
    for u in range(n_users):
        tag, variant = (CHAMPION, "champion") if u % 2 else (CHALLENGER, "challenger")  # the split starts
        for _ in range(3):
            t += 1.0
            rid, items = uuid.uuid4().hex, tuple(f"i{j}" for j in rng.permutation(50)[:10])
            impressions.append(Impression(rid, f"u{u}", items, tag, variant, t))
            if rng.random() < rates[tag]:
                item = items[int(rng.integers(0, 10))]
                events.append(Event(uuid.uuid4().hex, f"u{u}", item, "click", t + 5, None,
                                    rid if rng.random() < 0.8 else None))  # fmt: skip
    state.write_impressions(impressions)
    state.write_events(events)
    log = str(path / "log")
    EventLogExporter(state, log, batch_size=5000).export()
    state.close()
    return log


@pytest.mark.parametrize(("n_users", "verdict"), [(40, "not enough data to decide"), (3000, "challenger worse")])
def test_ab_report_calls_a_worse_challenger_only_after_the_minimum_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], n_users: int, verdict: str
) -> None:
    log = simulated_log(tmp_path, n_users, {CHAMPION: 0.3, CHALLENGER: 0.15}, seed=n_users)
    assert training_main(["models", "ab-report", "--events", log, "--json", "--min-effect", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["champion"], report["challenger"]) == (CHAMPION, CHALLENGER)
    assert report["verdict"] == verdict
    ctr = next(c for c in report["comparisons"] if c["metric"] == "ctr")
    assert ctr["users"] == [n_users // 2, n_users // 2]  # the early champion-only users are left out
    if verdict == "challenger worse":
        assert ctr["ci_high"] < 0 and min(ctr["users"]) >= ctr["min_users"]
        assert ctr["champion"] == pytest.approx(0.3, abs=0.03) and ctr["challenger"] == pytest.approx(0.15, abs=0.03)
    else:
        assert ctr["min_users"] > min(ctr["users"])
    rows = {r["model_version"]: r for r in report["per_variant"]}
    assert rows[CHAMPION]["impressions"] == 3 * (n_users // 2)
    assert report["ci_method"].startswith("delta-method")


def test_ab_report_text_names_the_ci_and_the_minimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = simulated_log(tmp_path, 40, {CHAMPION: 0.3, CHALLENGER: 0.3}, seed=1)
    assert training_main(["models", "ab-report", "--events", log]) == 0
    text = capsys.readouterr().out
    assert "95% CI: delta-method" in text and "minimum users per arm" in text
    assert "verdict (ctr): not enough data to decide" in text
