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

import httpx
import psutil
import pytest

from bench.loadgen import LoadResult, run_load
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, poll_until, start_server
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


def answered(server: ServerProcess) -> int:
    """/recommend requests the server answered 200 so far (its own /metrics)."""
    lines = httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
    return int(sum(float(x.split()[-1]) for x in lines if x.startswith("bentoml_service_request_total")
                   and 'endpoint="/recommend"' in x and 'http_response_code="200"' in x))  # fmt: skip


def wait_for_load(server: ServerProcess, requests: int = 30) -> None:
    """Until the background load is really being served (start-up is slow on a busy machine)."""
    poll_until(lambda: answered(server), 30, f"{requests} answered /recommend requests",
               lambda n: n >= requests)  # fmt: skip


def finished(thread: threading.Thread, out: dict[str, LoadResult], timeout: float) -> LoadResult:
    thread.join(timeout=timeout)
    assert not thread.is_alive() and "result" in out, f"the load generator did not finish within {timeout} s"
    return out["result"]


def test_killed_ranker_worker_recovers_within_10s(fresh_server: ServerProcess) -> None:
    before = ranker_workers(fresh_server)
    assert len(before) == 1, f"expected one ranking worker, found {[p.pid for p in before]}"
    victim = before[0]
    thread, out = load_in_background(fresh_server.url, seconds=15)
    wait_for_load(fresh_server)
    started = time.perf_counter()
    victim.kill()
    result = finished(thread, out, TRAFFIC_TIMEOUT_S + 30)
    kill_at = started - result.started_at
    failures = [(s, e, c) for s, e, c in result.timeline if c != 200]
    recovered_at = max((e for _, e, _ in failures), default=kill_at)
    new_ok = [e for s, e, c in result.timeline if c == 200 and s > kill_at]
    assert new_ok, f"no request sent after the kill (at {kill_at:.2f} s) succeeded: {result.summary()}"
    print(f"\nkilled ranker worker: {len(failures)} of {result.sent} requests failed; a request sent "
          f"after the kill succeeded {min(new_ok) - kill_at:.2f} s after it")  # fmt: skip
    assert recovered_at - kill_at < 10, f"failures until {recovered_at - kill_at:.2f} s after the kill"
    assert any(s > recovered_at for s, _, c in result.timeline if c == 200), "no success after recovery"
    slowest = max(e - s for s, e, _ in result.timeline)
    assert slowest < TRAFFIC_TIMEOUT_S + 1, f"a request hung for {slowest:.1f} s"
    poll_until(lambda: [p.pid for p in ranker_workers(fresh_server)], 30, "a new ranking worker",
               lambda pids: len(pids) == 1 and pids != [victim.pid])  # fmt: skip


def test_sigterm_under_load_finishes_in_flight_and_exits_0(fresh_server: ServerProcess) -> None:
    thread, out = load_in_background(fresh_server.url, seconds=10)
    wait_for_load(fresh_server)
    term_at = time.perf_counter()
    os.kill(fresh_server.proc.pid, signal.SIGTERM)
    assert fresh_server.proc.wait(timeout=40) == 0
    result = finished(thread, out, 60)
    sigterm = term_at - result.started_at
    assert any(s < sigterm < e for s, e, _ in result.timeline), f"no request in flight at SIGTERM: {result.summary()}"
    in_flight = [(s, e, c) for s, e, c in result.timeline if s < sigterm - 0.05]
    after = [(s, e, c) for s, e, c in result.timeline if s >= sigterm + 0.05]
    assert in_flight and all(c == 200 for _, _, c in in_flight), [c for *_, c in in_flight if c != 200]
    # New requests are refused (connection refused/reset or 503), at once, never a 500.
    errors = [line for line in fresh_server.log().splitlines() if "Error" in line][-12:]
    assert all(c in (-1, 200, 503) for _, _, c in after), (sorted({c for *_, c in after}), errors)
    slow = [round(e - s, 2) for s, e, _ in after if e - s >= 5]
    assert not slow, f"requests sent after SIGTERM took {slow} s"
    assert "status=500" not in fresh_server.log()
