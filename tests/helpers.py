"""Test helpers: paths, a small seeded dataset, and a real `bentoml serve` subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from training.datasets import Dataset, synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_DIR = Path(
    os.environ.get("RECSYS_MOVIELENS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "movielens-small")
)
BENTOML_BIN = str(Path(sys.executable).parent / "bentoml")
READY_TIMEOUT_S = 90.0


def small_synthetic(seed: int = 3) -> Dataset:
    """Small enough to train in seconds, large enough for the ranker to beat the baselines."""
    return synthetic(n_users=600, n_items=400, n_interactions=30_000, n_topics=20, seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM the whole process group (serve spawns workers), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(
    serve_args: list[str], cwd: Path, env: dict[str, str], wait: bool = True
) -> ServerProcess:
    """`bentoml serve ARGS --host 127.0.0.1 --port <free>`; waits for /readyz when `wait`."""
    port = free_port()
    log_path = Path(env.get("BENTOML_HOME", cwd)) / f"serve-{port}.log"
    full_env = {**os.environ, **env, "BENTOML_DO_NOT_TRACK": "true"}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [BENTOML_BIN, "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"{server.url} not ready after {timeout} s:\n{server.log()[-4000:]}")
