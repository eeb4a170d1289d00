"""Drift monitoring on a real server: traffic like the training data raises no alert, a
shifted feature alerts alone, two API workers' counts merge exactly, gauges reach
/metrics, and the offline report is built from the monitor logs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest

from models.core.recommender import Recommender
from models.core.schema import FEATURE_NAMES
from models.lifecycle.store import open_version
from tests.helpers import PROJECT_ROOT, ServerProcess, poll_until, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
SHIFTED = "item_log_pop"


@pytest.fixture
def drift_server(trained: TrainResult, bentoml_home: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    assert trained.tag is not None
    workers = getattr(request, "param", 1)
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag,
        "RECSYS_API_WORKERS": str(workers), "RECSYS_DRIFT_DIR": str(tmp_path / "drift"),
        "RECSYS_MONITOR_DIR": str(tmp_path / "monitoring"), "RECSYS_MONITOR_SAMPLE": "1.0",
    })  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def local(trained: TrainResult) -> Recommender:
    assert trained.tag is not None
    version = open_version(trained.tag)
    return Recommender(version.load_tables(), version.params)


def drift(server: ServerProcess, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The drift report once `done` holds: each worker writes its counts about once a second,
    later on a busy machine."""
    with bentoml.SyncHTTPClient(server.url) as client:
        return poll_until(client.drift_status, 30, "drift counts of every worker", done, interval=0.5)


def test_training_like_traffic_raises_no_alert(drift_server: ServerProcess, local: Recommender) -> None:
    users = local.tables.user_ids
    with bentoml.SyncHTTPClient(drift_server.url) as client:
        for user in users[np.random.default_rng(1).permutation(len(users))[:300]]:
            client.recommend(user_id=str(user), k=10)
    report = drift(drift_server, lambda r: r["requests"] >= 300)
    assert report["requests"] == 300 and report["rows"] > 300
    alerts = {n: f["psi"] for n, f in report["features"].items() if f["status"] == "alert"}
    assert not alerts, alerts
    assert report["score"]["status"] != "alert"
    assert report["model_version"] == local_tag(drift_server)


def local_tag(server: ServerProcess) -> str:
    with bentoml.SyncHTTPClient(server.url) as client:
        return str(client.model_info()["tag"])


def send_shifted_rows(server: ServerProcess, local: Recommender) -> int:
    """/score the candidates of 100 users (like training traffic) with one feature moved."""
    rows = np.vstack([local.prepare_recommend(u, True).features for u in range(0, 300, 3)])
    rows[:, FEATURE_NAMES.index(SHIFTED)] += 3.0
    with bentoml.SyncHTTPClient(server.url) as client:
        for start in range(0, len(rows), 200):
            client.score(rows=[dict(zip(FEATURE_NAMES, map(float, r))) for r in rows[start : start + 200]])
    return len(rows)


def test_a_shifted_feature_alerts_alone(drift_server: ServerProcess, local: Recommender) -> None:
    sent = send_shifted_rows(drift_server, local)
    report = drift(drift_server, lambda r: r["rows"] >= sent)
    assert report["rows"] == sent
    statuses = {n: f["status"] for n, f in report["features"].items()}
    assert statuses.pop(SHIFTED) == "alert"
    assert "alert" not in statuses.values(), statuses
    metrics = httpx.get(f"{drift_server.url}/metrics", timeout=10).text
    gauge = re.search(rf'recsys_drift_psi{{[^}}]*feature="{SHIFTED}"[^}}]*}} ([0-9.e+-]+)', metrics)
    assert gauge and float(gauge.group(1)) >= 0.25


@pytest.mark.parametrize("drift_server", [2], indirect=True)
def test_two_api_workers_merge_to_the_rows_sent(drift_server: ServerProcess, local: Recommender) -> None:
    sent = 0
    for i in range(40):
        # a new connection each time, so that both workers get requests
        rows = local.prepare_recommend(i, True).features[: 5 + i]
        body = {"rows": [dict(zip(FEATURE_NAMES, map(float, r))) for r in rows]}
        assert httpx.post(f"{drift_server.url}/score", json=body, timeout=30).status_code == 200
        sent += len(rows)
    report = drift(drift_server, lambda r: r["rows"] >= sent and r["workers"] >= 2)
    assert report["rows"] == sent and report["requests"] == 40
    assert report["workers"] == 2


def test_offline_report_from_the_monitor_logs(drift_server: ServerProcess, local: Recommender, tmp_path: Path,
                                              bentoml_home: Path) -> None:  # fmt: skip
    send_shifted_rows(drift_server, local)
    tag = local_tag(drift_server)
    logs = tmp_path / "monitoring"  # the fixture's RECSYS_MONITOR_DIR: tmp_path is per test
    out = tmp_path / "drift.html"
    done = subprocess.run(
        [sys.executable, "-m", "training", "drift-report", "--logs", str(logs), "--model", tag, "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert all(name in page for name in FEATURE_NAMES) and page.count("<img") == len(FEATURE_NAMES) + 1
    alerts = ast.literal_eval(done.stdout.split("alerts: ")[1].strip())
    assert [a for a in alerts if a != "score"] == [SHIFTED]  # the score moves with the feature
