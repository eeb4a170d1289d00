"""The settings that shape serving, seen on real servers: the worker processes started, and
the adaptive batches the ranking service forms (rows, never above RECSYS_MAX_BATCH_SIZE)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from models.core.schema import N_FEATURES
from models.serving.versioned import version_id
from tests.helpers import PROJECT_ROOT, poll_until, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
BATCH_METRIC = "bentoml_service_adaptive_batch_size"


def test_worker_processes_follow_the_settings(trained: TrainResult, bentoml_home: Path) -> None:
    """Not the defaults (2 API workers, 1 ranking worker): 3 and 2."""
    server = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag),
        "RECSYS_API_WORKERS": "3", "RECSYS_RANKER_WORKERS": "2",
    })  # fmt: skip
    try:
        # /readyz answers once one worker of each service is up; the others may still start.
        poll_until(lambda: Counter(name for name, _ in server.workers()), 60, "the worker processes",
                   lambda found: found == {"ApiService": 3, "RankerService": 2})  # fmt: skip
    finally:
        server.stop()


def batch_sizes(metrics: str) -> dict[str, float]:
    """BentoML's histogram of the /score batches: count, sum (rows, for 1-row requests) and
    the cumulative count per bucket bound."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(BATCH_METRIC) and 'method_name="score"' in line:
            value = float(line.split()[-1])
            if line.startswith(f"{BATCH_METRIC}_bucket"):
                key = "le " + line.split('le="')[1].split('"')[0]
            else:
                key = line.split("{")[0].removeprefix(f"{BATCH_METRIC}_")
            found[key] = found.get(key, 0.0) + value  # summed over workers
    return found


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_batches_never_exceed_max_batch_size(trained: TrainResult, bentoml_home: Path, batching: bool) -> None:
    """A burst of 1-row /score calls to a ranking service with RECSYS_MAX_BATCH_SIZE=4: with
    batching, batches of several rows form and none has more than 4; with RECSYS_BATCHING
    off, no batch at all."""
    server = start_server(["service:RankerService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag),
        "RECSYS_MAX_BATCH_SIZE": "4", "RECSYS_BATCHING": str(batching).lower(),
    })  # fmt: skip
    sent = 1000
    vid = version_id(str(trained.tag))
    try:
        async def burst() -> list[int]:
            # 32 connections: plenty of concurrency for batches of 4 to form. With 128 on a
            # loaded CI machine a connection was sometimes reset (httpx.ReadError).
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=httpx.Limits(max_connections=32)) as client:  # fmt: skip
                async def one(i: int) -> int:
                    row = [[vid] + [(i % 7) / 7.0] * N_FEATURES]  # the version id, then the features
                    return (await client.post("/score", json={"features": row})).status_code
                return await asyncio.gather(*(one(i) for i in range(sent)))

        statuses = asyncio.run(burst())
        assert Counter(statuses) == {200: sent}
        sizes = batch_sizes(httpx.get(f"{server.url}/metrics", timeout=10).text)
        if not batching:
            assert sizes.get("count", 0) == 0, sizes
            return
        # Every row went through the batcher, and every batch is in the buckets up to 4.
        assert (sizes["sum"], sizes["le 4.0"]) == (sent, sizes["count"]), sizes
        assert sizes["le 2.0"] < sizes["count"], f"no batch of more than 2 rows formed: {sizes}"
    finally:
        server.stop()
