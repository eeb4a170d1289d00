"""Drift that can be trusted, in-process on a trained model (issue 17): 8 /recommend
requests are insufficient_data, never an alert; users warmed by events show in the report's
online traffic; drift-report on no logged rows writes nothing and exits non-zero."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from models.core.drift import INSUFFICIENT
from models.core.ranking import predict_scores
from models.core.recommender import Recommender
from models.lifecycle.store import open_version
from models.serving.monitoring import MONITOR_NAME, DriftMonitor
from models.serving.online import OnlineLimits
from models.serving.online.sqlite import SqliteState
from models.serving.orchestration import Ranking
from models.serving.realtime import RealTime
from models.serving.settings import RecsysSettings
from models.serving.variants import Variant
from training.__main__ import main as training_main
from training.pipeline import TrainResult

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


def _ranking(tag: str, settings: RecsysSettings, realtime: RealTime | None = None) -> Ranking:
    version = open_version(tag)
    drift = DriftMonitor(settings, version.tag, version.path, role="api")
    champion = Variant("champion", version, Recommender.of(version), drift, "score")  # type: ignore[arg-type]
    booster = version.load_booster(nthread=1)

    async def score(v: Variant, features: np.ndarray) -> np.ndarray:
        return predict_scores(booster, features)

    return Ranking(settings, champion, None, score, realtime)


def _settings(tmp_path: Path) -> RecsysSettings:
    return RecsysSettings(drift_dir=tmp_path / "drift", monitor_sample=0.0, request_log_sample=0.0,
                          monitor_dir=tmp_path / "monitor")  # fmt: skip


def test_eight_recommend_requests_never_warn_or_alert(trained: TrainResult, tmp_path: Path) -> None:
    """The issue's case: /drift after 8 requests said `user_log_count` PSI 6.84 alert."""
    assert trained.tag is not None
    ranking = _ranking(trained.tag, _settings(tmp_path))
    users = ranking.champion.recommender.tables.user_ids[:8]

    async def scenario() -> None:
        for user in users:
            await ranking.recommend(str(user), 10, True)

    asyncio.run(scenario())
    report = ranking.champion.drift.report()
    assert report["requests"] == 8 and report["rows"] > 8
    statuses = {name: f["status"] for name, f in report["features"].items()}
    statuses["__score__"] = report["score"]["status"]
    judged = {name: s for name, s in statuses.items() if s in ("warn", "alert")}
    assert not judged, (judged, report["features"])
    assert statuses["user_log_count"] == INSUFFICIENT
    assert report["status"] == "ok", report["status"]  # the statistics with enough rows: item features, score


def test_users_warmed_by_events_show_in_the_online_traffic(trained: TrainResult, tmp_path: Path) -> None:
    assert trained.tag is not None
    settings = _settings(tmp_path)
    limits = OnlineLimits(max_items=50, retention_s=1e9, journal_s=1e9, timeout_s=2)
    realtime = RealTime(settings, SqliteState(tmp_path / "state.sqlite3", limits))
    ranking = _ranking(trained.tag, settings, realtime)
    items = [str(i) for i in ranking.champion.recommender.tables.item_ids[:3]]
    known = str(ranking.champion.recommender.tables.user_ids[0])

    async def scenario() -> None:
        events = [{"event_id": uuid.uuid4().hex, "user_id": "new-user", "item_id": item, "type": "view",
                   "timestamp": 1.0 + i} for i, item in enumerate(items)]  # fmt: skip
        await realtime.accept(events, lambda item: True)
        await ranking.recommend("new-user", 5, True)  # warmed: 3 online items, unknown at training
        await ranking.recommend(known, 5, True)  # trained history only
        await ranking.recommend("nobody", 5, True)  # cold

    try:
        asyncio.run(scenario())
    finally:
        realtime.close()
    online = ranking.champion.drift.report()["online"]
    assert online["requests"] == 1 and online["share"] == pytest.approx(1 / 3, abs=1e-4)
    assert online["warmed_share"] == pytest.approx(1 / 3, abs=1e-4) and online["mean_length"] == 3.0
    assert online["length_histogram"]["2-4"] == 1


@pytest.mark.parametrize("records", [[], [{"cold_start": True, "features": [], "scores": []}]],
                         ids=["other-version-only", "cold-requests-only"])  # fmt: skip
def test_drift_report_on_no_rows_says_so_and_exits_non_zero(trained: TrainResult, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             records: list[dict[str, object]]) -> None:  # fmt: skip
    assert trained.tag is not None
    data = tmp_path / "logs" / MONITOR_NAME / "data"
    data.mkdir(parents=True)
    lines = [{"model_version": "recsys-test:someother", "features": [[0.0] * 16], "scores": [0.1]}]
    lines += [{"model_version": trained.tag, **r} for r in records]
    (data / "data.1.log").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "drift.html"
    code = training_main(["drift-report", "--logs", str(tmp_path / "logs"), "--model", trained.tag, "--out", str(out)])
    assert code == 1
    assert not out.exists()
    assert f"no logged rows for {trained.tag}" in capsys.readouterr().err


def test_drift_report_on_a_few_logged_requests_judges_no_user_feature(trained: TrainResult, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """5 logged requests of 40 rows each, user features moved far: their sample is 5 requests,
    so they are insufficient_data, not alerts; the last line still lists the alerts."""
    assert trained.tag is not None
    rec = Recommender.of(open_version(trained.tag))
    data = tmp_path / "logs" / MONITOR_NAME / "data"
    data.mkdir(parents=True)
    lines = []
    for user in range(5):
        rows = rec.prepare_recommend(user, True).features[:40].copy()
        rows[:, 0] += 50.0  # user_log_count, far outside its reference
        lines.append({"model_version": trained.tag, "cold_start": False, "features": rows.tolist(),
                      "scores": [0.0] * len(rows)})  # fmt: skip
    (data / "data.1.log").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "drift.html"
    code = training_main(["drift-report", "--logs", str(tmp_path / "logs"), "--model", trained.tag, "--out", str(out)])
    first, last = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out.exists()
    assert first.startswith(INSUFFICIENT) and "user_log_count" in first
    assert "user_log_count" not in last.split("alerts: ")[1]
