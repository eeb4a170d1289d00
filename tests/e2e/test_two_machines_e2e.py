"""Two machines on one: a real `mlflow server` on a loopback port (SQLite backend, a local
artifact folder) and two `bentoml serve` processes with BENTOML_HOMEs of their own that
share nothing but that server. A third home trains and promotes. Both servers start on
the champion they lacked (fetched from the artifact store), switch to a new champion
(fetched too) and come back on a rollback.

Needs the registry over MLflow (models/lifecycle/registry.py with `tracking_uri`); with
the JSON registry, or without `mlflow` installed, it skips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.lifecycle import registry
from tests.helpers import PROJECT_ROOT, ServerProcess, free_port, poll_until, start_server

pytestmark = pytest.mark.e2e
NAME = "two-machines"
SWITCH_WITHIN_S = 10.0
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
TRAIN_ARGS = ["--n-users", "600", "--n-items", "400", "--n-interactions", "30000", "--tune-budget", "0"]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1, stopped by its process group's id."""
    pytest.importorskip("mlflow")
    if not hasattr(registry, "tracking_uri"):
        pytest.skip("the registry of stages is not over MLflow yet (models/lifecycle/registry.py)")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll_until(healthy, 120, "mlflow server answers /health", interval=0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


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
