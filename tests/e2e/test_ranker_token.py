"""The internal hop is closed: with RECSYS_RANKER_TOKEN set, a ranking service run on its
own answers only calls with the token (probes and /metrics stay open), and an API service
with the same token ranks through it; with another token it gets a 503, never a score."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.core.schema import N_FEATURES
from models.serving.versioned import tag_rows, version_id
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
TOKEN = "internal-s3cret"


@pytest.fixture(scope="module")
def ranker(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    env = {"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag), "RECSYS_RANKER_TOKEN": TOKEN}
    proc = start_server(["service:RankerService"], cwd=PROJECT_ROOT, env=env)
    try:
        yield proc
    finally:
        proc.stop()


def score(ranker: ServerProcess, headers: dict[str, str], tag: str) -> httpx.Response:
    # BentoML's JSON body for a numpy input: {"features": [[...], ...]}; each row names its
    # version first (models/serving/versioned.py).
    body = {"features": tag_rows(version_id(tag), np.zeros((2, N_FEATURES))).tolist()}
    return httpx.post(f"{ranker.url}/score", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": f"Bearer {TOKEN}"}, 200)],
    ids=["no token", "wrong token", "token"],
)
def test_the_ranking_service_scores_only_for_the_token(ranker: ServerProcess, headers: dict[str, str],
                                                       status: int, trained: TrainResult) -> None:  # fmt: skip
    response = score(ranker, headers, str(trained.tag))
    assert response.status_code == status, response.text
    if status == 200:
        assert len(response.json()) == 2


@pytest.mark.parametrize("path", ["/readyz", "/livez", "/metrics"])
def test_probes_and_metrics_stay_open(ranker: ServerProcess, path: str) -> None:
    assert httpx.get(f"{ranker.url}{path}", timeout=10).status_code == 200


@pytest.mark.parametrize(("token", "status"), [(TOKEN, 200), ("another", 503)], ids=["same token", "other token"])
def test_the_api_ranks_through_it_with_the_token(ranker: ServerProcess, trained: TrainResult, bentoml_home: Path,
                                                 token: str, status: int) -> None:  # fmt: skip
    env = {"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag),
           "RECSYS_RANKER_URLS": ranker.url, "RECSYS_RANKER_TOKEN": token}  # fmt: skip
    seen = len(ranker.log())
    api = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env=env)
    try:
        response = httpx.post(f"{api.url}/recommend", json={"user_id": "u1", "k": 5}, timeout=30)
    finally:
        api.stop()
    assert response.status_code == status, response.text
    refused = [line for line in ranker.log()[seen:].splitlines() if " 401: " in line]
    if status == 200:
        assert len(response.json()["items"]) == 5 and not refused
    else:  # the 503 is the ranking service refusing the wrong token, not any other fault
        assert refused, ranker.log()[seen:][-2000:]


def test_one_serve_with_a_token_ranks(trained: TrainResult, bentoml_home: Path) -> None:
    """`bentoml serve service:ApiService` starts both services: its API sends the token to
    its own ranking service too."""
    env = {"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag), "RECSYS_RANKER_TOKEN": TOKEN}
    api = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env=env)
    try:
        response = httpx.post(f"{api.url}/recommend", json={"user_id": "u1", "k": 5}, timeout=30)
    finally:
        api.stop()
    assert response.status_code == 200, response.text


def test_a_ranking_service_on_its_own_refuses_pickles(ranker: ServerProcess, trained: TrainResult) -> None:
    """Served on its own (a main server), BentoML refuses its pickle media type (415); the
    pickle hop exists only inside one `bentoml serve`, where models/serving/bentoml_patches.py
    loads numpy only (tests/integration/test_bentoml_patches.py)."""
    import pickle

    features = tag_rows(version_id(str(trained.tag)), np.zeros((2, N_FEATURES)))
    response = httpx.post(f"{ranker.url}/score", content=pickle.dumps({"features": features}, protocol=5), timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.bentoml+pickle"})  # fmt: skip
    assert response.status_code == 415, response.text
