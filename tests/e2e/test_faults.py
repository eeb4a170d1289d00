"""Faults under load on a real server: a killed ranking worker, and SIGTERM. Load is
bounded in time and goes to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.loadgen import LoadResult, run_load
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TRAFFIC_TIMEOUT_S = RecsysSettings().traffic_timeout_s


@pytest.fixture
def fresh_server(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    assert trained.tag is not None
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                        env={"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag})  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def load_in_background(url: str, seconds: float, concurrency: int = 8) -> tuple[threading.Thread, dict[str, LoadResult]]:
    out: dict[str, LoadResult] = {}

    def body(i: int) -> dict[str, object]:
        return {"user_id": f"u{i % 500}", "k": 10}

    def target() -> None:
        out["result"] = asyncio.run(run_load(f"{url}/recommend", body, concurrency, seconds,
                                             timeout_s=TRAFFIC_TIMEOUT_S + 5))  # fmt: skip

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def ranker_workers(server: ServerProcess) -> list[psutil.Process]:
    return [p for name, p in server.workers() if name == "RankerService"]


def test_killed_ranker_worker_recovers_within_10s(fresh_server: ServerProcess) -> None:
    (victim,) = ranker_workers(fresh_server)
    thread, out = load_in_background(fresh_server.url, seconds=15)
    time.sleep(3)
    started = time.perf_counter()
    victim.kill()
    thread.join(timeout=TRAFFIC_TIMEOUT_S + 30)
    result = out["result"]
    kill_at = started - result.started_at
    failures = [(s, e, c) for s, e, c in result.timeline if c != 200]
    recovered_at = max((e for _, e, _ in failures), default=kill_at)
    first_new_ok = min(e for s, e, c in result.timeline if c == 200 and s > kill_at)
    print(f"\nkilled ranker worker: {len(failures)} of {result.sent} requests failed; a request sent "
          f"after the kill succeeded {first_new_ok - kill_at:.2f} s after it")  # fmt: skip
    assert recovered_at - kill_at < 10
    assert any(s > recovered_at for s, _, c in result.timeline if c == 200), "no success after recovery"
    assert max(e - s for s, e, _ in result.timeline) < TRAFFIC_TIMEOUT_S + 1, "a request hung"
    assert [p.pid for p in ranker_workers(fresh_server)] != [victim.pid]  # a new worker


def test_sigterm_under_load_finishes_in_flight_and_exits_0(fresh_server: ServerProcess) -> None:
    thread, out = load_in_background(fresh_server.url, seconds=6)
    time.sleep(2)
    term_at = time.perf_counter()
    os.kill(fresh_server.proc.pid, signal.SIGTERM)
    assert fresh_server.proc.wait(timeout=40) == 0
    thread.join(timeout=60)
    result = out["result"]
    sigterm = term_at - result.started_at
    in_flight = [(s, e, c) for s, e, c in result.timeline if s < sigterm - 0.05]
    after = [(s, e, c) for s, e, c in result.timeline if s >= sigterm + 0.05]
    assert in_flight and all(c == 200 for _, _, c in in_flight), [c for *_, c in in_flight if c != 200]
    # New requests are refused (connection refused/reset or 503), at once, never a 500.
    errors = [line for line in fresh_server.log().splitlines() if "Error" in line][-12:]
    assert all(c in (-1, 200, 503) for _, _, c in after), (sorted({c for *_, c in after}), errors)
    assert all(e - s < 5 for s, e, _ in after)
    assert "status=500" not in fresh_server.log()
