"""Test helpers: paths, a small seeded dataset, polling with a deadline, and the server
helpers of bench/servers.py (bentoml serve, redis-server, mlflow server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.servers import (
    BENTOML_BIN,
    RedisServer,
    ServerProcess,
    free_port,
    start_mlflow_server,
    start_redis,
    start_server,
    wait_ready,
)
from training.datasets import Dataset, synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_DIR = Path(
    os.environ.get("RECSYS_MOVIELENS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "movielens-small")
)


T = TypeVar("T")


def _truthy(value: object) -> bool:
    return bool(value)


def poll_until(
    observe: Callable[[], T], timeout: float, what: str,
    done: Callable[[T], bool] = _truthy, interval: float = 0.2,
) -> T:
    """Call `observe` until `done(value)` holds and return that value. Past `timeout`
    seconds: an AssertionError naming `what`, the time waited and the last value seen (the
    machine is shared: wait for the state, never a fixed time)."""
    start = time.monotonic()
    while True:
        value = observe()
        if done(value):
            return value
        waited = time.monotonic() - start
        if waited >= timeout:
            seen = repr(value)
            seen = seen if len(seen) <= 2000 else f"{seen[:2000]}... ({len(seen)} characters)"
            raise AssertionError(f"{what}: not reached after {waited:.1f} s; last observed: {seen}")
        time.sleep(interval)


def dead_pid() -> int:
    """The pid of a process that has just ended (for clean-up of what dead owners left)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def small_synthetic(seed: int = 3) -> Dataset:
    """Small enough to train in seconds, large enough for the ranker to beat the baselines."""
    return synthetic(n_users=600, n_items=400, n_interactions=30_000, n_topics=20, seed=seed)


__all__ = [
    "BENTOML_BIN",
    "MOVIELENS_DIR",
    "PROJECT_ROOT",
    "RedisServer",
    "ServerProcess",
    "dead_pid",
    "free_port",
    "poll_until",
    "small_synthetic",
    "start_mlflow_server",
    "start_redis",
    "start_server",
    "wait_ready",
]  # fmt: skip
