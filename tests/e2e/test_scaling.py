"""Separate scaling: two ranking services started on their own (`bentoml serve
service:RankerService`) on different ports, behind an API service that spawns none
(RECSYS_RANKER_URLS). Both get traffic; kill one and the rest keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest

from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e


def ranker_calls(api: ServerProcess, ranker: ServerProcess, outcome: str = "ok") -> float:
    """Calls the API made to the ranking service at `ranker.url`, by outcome."""
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    line = f'recsys_ranker_calls_total{{outcome="{outcome}",ranker="{ranker.url}"}}'
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


@pytest.fixture(scope="module")
def cluster(trained: TrainResult, bentoml_home: Path) -> Iterator[dict[str, object]]:
    # A short call timeout, so that a hung ranking service is left quickly (test below).
    env = {"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag), "RECSYS_RANKER_TIMEOUT_S": "1"}
    rankers = [start_server(["service:RankerService"], cwd=PROJECT_ROOT, env=env) for _ in range(2)]
    api: ServerProcess | None = None
    try:
        api = start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                           env={**env, "RECSYS_RANKER_URLS": ",".join(r.url for r in rankers)})  # fmt: skip
        yield {"api": api, "rankers": rankers}
    finally:
        for proc in [api, *rankers]:
            if proc is not None:
                proc.stop()


def test_api_spawns_no_ranking_service_of_its_own(cluster: dict[str, object]) -> None:
    api = cluster["api"]
    assert isinstance(api, ServerProcess)
    assert {name for name, _ in api.workers()} == {"ApiService"}


def test_a_hung_ranking_service_times_out_into_the_other_then_a_503(cluster: dict[str, object]) -> None:
    """A ranking service that accepts connections and never answers (SIGSTOPped): each call
    to it times out and goes to the other; with both hung, a 503 with Retry-After."""
    api, rankers = cluster["api"], cluster["rankers"]
    assert isinstance(api, ServerProcess) and isinstance(rankers, list)
    timeouts = ranker_calls(api, rankers[0], "TimeoutError")
    rankers[0].freeze()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            answers = [client.post("/recommend", json={"user_id": f"u{i}", "k": 5}) for i in range(20)]
            assert [r.status_code for r in answers] == [200] * 20
            assert ranker_calls(api, rankers[0], "TimeoutError") - timeouts >= 1
            rankers[1].freeze()
            try:
                hung = client.post("/recommend", json={"user_id": "u1", "k": 5})
            finally:
                rankers[1].freeze(False)
    finally:
        rankers[0].freeze(False)
    assert hung.status_code == 503, hung.text
    assert hung.headers.get("retry-after") == "1"


def test_both_ranking_services_serve_and_one_can_die(cluster: dict[str, object]) -> None:
    api, rankers = cluster["api"], cluster["rankers"]
    assert isinstance(api, ServerProcess) and isinstance(rankers, list)
    before = [ranker_calls(api, r) for r in rankers]
    with bentoml.SyncHTTPClient(api.url) as client:
        first = [client.recommend(user_id=f"u{i}", k=5) for i in range(40)]
        after = [ranker_calls(api, r) for r in rankers]
        assert all(a - b >= 10 for a, b in zip(after, before)), (before, after)  # round-robin: both
        rankers[0].kill()
        second = [client.recommend(user_id=f"u{i}", k=5) for i in range(40)]
    assert [r["items"] for r in second] == [r["items"] for r in first]  # same answers, no errors
    assert ranker_calls(api, rankers[1]) - after[1] >= 40
    assert ranker_calls(api, rankers[0]) == after[0]


# An API and a ranking service at different versions: tests/e2e/test_reload_e2e.py
# (test_the_services_never_mix_versions): rows name their version, so the ranking service
# scores with that version's booster or refuses; it never mixes.
