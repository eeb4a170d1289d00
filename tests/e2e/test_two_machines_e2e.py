"""Two machines on one: a real `mlflow server` on a loopback port (SQLite backend, a local
artifact folder) and two `bentoml serve` processes with BENTOML_HOMEs of their own that
share nothing but that server. A third home trains and promotes. Both servers start on
the champion they lacked (fetched from the artifact store), switch to a new champion
(fetched too) and come back on a rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import PROJECT_ROOT, ServerProcess, poll_until, start_server

pytestmark = pytest.mark.e2e
NAME = "two-machines"
SWITCH_WITHIN_S = 10.0
TRAIN_ARGS = ["--n-users", "600", "--n-items", "400", "--n-interactions", "30000", "--tune-budget", "0"]


@pytest.fixture
def tracking_server(mlflow_server: ServerProcess) -> str:
    """The shared `mlflow server` of tests/conftest.py: its URL is every home's tracking URI."""
    return mlflow_server.url


def run_training(home: Path, uri: str, *args: str) -> dict[str, object]:
    env = {**os.environ, "BENTOML_HOME": str(home), "MLFLOW_TRACKING_URI": uri, "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "training", *args], check=False, cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]) if "--json" in args else {}


def tags_seen(server: ServerProcess, n: int = 8) -> set[str]:
    return {httpx.post(f"{server.url}/model", json={}, timeout=10).json()["tag"] for _ in range(n)}


def test_two_machines_follow_one_registry(tracking_server: str, tmp_path: Path) -> None:
    trainer, home_a, home_b = (tmp_path / h for h in ("trainer", "a", "b"))
    first = run_training(trainer, tracking_server, *TRAIN_ARGS, "--seed", "3", "--model-name", NAME, "--promote", "--json")
    v1 = str(first["tag"])
    assert first["champion"] == v1
    servers: list[ServerProcess] = []
    try:
        for home in (home_a, home_b):  # neither store holds v1: each fetches it at start
            servers.append(start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
                "BENTOML_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_server, "RECSYS_MODEL_NAME": NAME,
                "RECSYS_MONITOR_SAMPLE": "0", "RECSYS_REQUEST_LOG_SAMPLE": "0",
            }))  # fmt: skip
        assert [tags_seen(s) for s in servers] == [{v1}, {v1}]
        v2 = str(run_training(trainer, tracking_server, *TRAIN_ARGS, "--seed", "4", "--model-name", NAME, "--json")["tag"])
        run_training(trainer, tracking_server, "models", "promote", v2, "--name", NAME)
        for server in servers:
            poll_until(lambda s=server: tags_seen(s), SWITCH_WITHIN_S + 20, f"{server.url} serves {v2}",
                       lambda seen: seen == {v2}, interval=0.5)  # fmt: skip
            answer = httpx.post(f"{server.url}/recommend", json={"user_id": "u1", "k": 5}, timeout=10).json()
            assert answer["model_tag"] == v2
        for home in (home_a, home_b):  # fetched into each store, checked
            assert (home / "models" / NAME / v2.split(":")[1] / "manifest.json").is_file()
        run_training(trainer, tracking_server, "models", "rollback", "--name", NAME)
        for server in servers:
            poll_until(lambda s=server: tags_seen(s), SWITCH_WITHIN_S + 20, f"{server.url} serves {v1} again",
                       lambda seen: seen == {v1}, interval=0.5)  # fmt: skip
    finally:
        for server in servers:
            server.stop()
