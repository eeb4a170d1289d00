"""A real `bentoml serve service:ApiService` (API + ranking service) on 127.0.0.1, called
with BentoML's SDK clients; answers are checked against the same model run in-process."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest

from models.core.ranking import predict_scores
from models.core.recommender import Recommender
from models.core.schema import FEATURE_NAMES, SCHEMA_HASH
from models.lifecycle.registry import registry_path
from models.lifecycle.store import BOOSTER_FILE, DEFAULT_MODEL_NAME, ModelVersion, open_version, store_home
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def version(trained: TrainResult) -> ModelVersion:
    assert trained.tag is not None
    return open_version(trained.tag)


@pytest.fixture(scope="module")
def local(version: ModelVersion) -> Recommender:
    return Recommender(version.load_tables(), version.params)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[bentoml.SyncHTTPClient]:
    with bentoml.SyncHTTPClient(server.url, server_ready_timeout=60) as c:
        yield c


def expected_recommendation(
    version: ModelVersion, local: Recommender, user_id: str, k: int, exclude_seen: bool
) -> list[dict[str, Any]]:
    user = local.user_index(user_id)
    assert user is not None
    prepared = local.prepare_recommend(user, exclude_seen)
    scores = predict_scores(version.load_booster(nthread=1), prepared.features)
    return local.ranked(prepared, scores, k)


@pytest.mark.parametrize("exclude_seen", [True, False])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_recommend_matches_the_in_process_pipeline(
    client: bentoml.SyncHTTPClient, version: ModelVersion, local: Recommender, k: int, exclude_seen: bool
) -> None:
    for user_id in local.tables.user_ids[[0, 7, 123]]:
        got = client.recommend(user_id=str(user_id), k=k, exclude_seen=exclude_seen)
        want = expected_recommendation(version, local, str(user_id), k, exclude_seen)
        assert got["model_tag"] == version.tag and got["fallback"] is False
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in want]
        assert np.allclose([i["score"] for i in got["items"]], [i["score"] for i in want], atol=1e-5)
        assert [i["rank"] for i in got["items"]] == list(range(1, len(want) + 1))
        scores = [i["score"] for i in got["items"]]
        assert scores == sorted(scores, reverse=True)
        if exclude_seen:
            seen = set(local.tables.item_ids[local.tables.history(local.user_index(str(user_id)))])
            assert not seen & {i["item_id"] for i in got["items"]}


def test_unknown_user_gets_the_popularity_fallback(
    client: bentoml.SyncHTTPClient, local: Recommender
) -> None:
    got = client.recommend(user_id="someone-new", k=5)
    assert got["fallback"] is True and "unknown user" in got["fallback_reason"]
    assert [i["item_id"] for i in got["items"]] == local.tables.item_ids[local.popular(5)].tolist()
    assert all(i["score"] is None for i in got["items"])


def test_rank_orders_the_given_items(client: bentoml.SyncHTTPClient, local: Recommender) -> None:
    user_id = str(local.tables.user_ids[3])
    item_ids = local.tables.item_ids[[5, 50, 17, 99, 0]].tolist()
    got = client.rank(user_id=user_id, item_ids=item_ids)
    assert sorted(i["item_id"] for i in got["items"]) == sorted(item_ids)
    scores = [i["score"] for i in got["items"]]
    assert scores == sorted(scores, reverse=True) and got["cold_start"] is False
    assert client.rank(user_id="stranger", item_ids=item_ids)["cold_start"] is True


def test_score_equals_the_booster(client: bentoml.SyncHTTPClient, version: ModelVersion, local: Recommender) -> None:
    prepared = local.prepare_recommend(0, exclude_seen=True)
    rows = [dict(zip(FEATURE_NAMES, map(float, r))) for r in prepared.features[:25]]
    got = client.score(rows=rows)
    want = predict_scores(version.load_booster(nthread=1), prepared.features[:25])
    assert np.allclose(got["scores"], want, atol=1e-5)


def test_model_endpoint_describes_the_version(client: bentoml.SyncHTTPClient, version: ModelVersion) -> None:
    got = client.model_info()
    assert got["tag"] == version.tag
    assert got["schema_hash"] == version.metadata["schema_hash"]
    assert [f["name"] for f in got["feature_schema"]] == list(FEATURE_NAMES)
    assert got["metrics"]["model"]["ndcg"] == pytest.approx(version.metadata["metrics"]["model"]["ndcg"])
    assert got["dataset"]["content_hash"] == version.metadata["dataset"]["content_hash"]


def _row(**override: Any) -> dict[str, Any]:
    return {**dict.fromkeys(FEATURE_NAMES, 0.5), **override}


BAD_REQUESTS = [
    ("/recommend", {"k": 3}, "user_id", "missing"),
    ("/recommend", {"user_id": "1", "k": 0}, "k", "greater_than_equal"),
    ("/recommend", {"user_id": "1", "k": 101}, "k", "less_than_equal"),
    ("/recommend", {"user_id": "1", "k": "ten"}, "k", "int_type"),
    ("/recommend", {"user_id": True}, "user_id", "string_type"),
    ("/recommend", {"user_id": 318}, "user_id", "string_type"),
    ("/recommend", {"user_id": "1", "k": "10"}, "k", "int_type"),
    ("/recommend", {"user_id": "1", "k": 2.5}, "k", "int_type"),
    ("/recommend", {"user_id": "1", "exclude_seen": 0}, "exclude_seen", "bool_type"),
    ("/recommend", {"user_id": ""}, "user_id", "string_too_short"),
    ("/recommend", {"user_id": "1", "exclude_seen": "maybe"}, "exclude_seen", "bool_type"),
    ("/rank", {"user_id": "1", "item_ids": []}, "item_ids", "too_short"),
    ("/rank", {"user_id": "1", "item_ids": ["x"] * 1001}, "item_ids", "too_long"),
    ("/rank", {"user_id": "1", "item_ids": ["no-such-item", "nor-this"]}, "item_ids", "unknown_item_ids"),
    ("/score", {"rows": []}, "rows", "too_short"),
    ("/score", {"rows": [_row(cooc_score=float("nan"))]}, "rows", "finite_number"),
    ("/score", {"rows": [_row(cooc_score=float("inf"))]}, "rows", "finite_number"),
    ("/score", {"rows": [{**_row(), "colour": 1.0}]}, "rows", "extra_forbidden"),
    ("/score", {"rows": [{k: v for k, v in _row().items() if k != "pop_rank"}]}, "rows", "missing"),
]


@pytest.mark.parametrize(("path", "body", "field", "error_type"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_field_and_rule(
    server: ServerProcess, path: str, body: dict[str, Any], field: str, error_type: str
) -> None:
    import json

    # allow_nan: NaN/Infinity reach the server as JSON5-style literals, as a careless client sends them
    resp = httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True),
                      headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert resp.status_code == 400, resp.text
    payload = resp.json()
    assert payload["error"]
    detail = payload["detail"][0]
    assert detail["loc"][0] == field and detail["type"] == error_type and detail["msg"]
    if error_type == "unknown_item_ids":
        assert "no-such-item" in detail["msg"] and "nor-this" in detail["msg"]


def test_openapi_documents_the_limits(server: ServerProcess) -> None:
    doc = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    assert {"/recommend", "/rank", "/score", "/model"} <= set(doc["paths"])
    text = str(doc)
    assert "'maximum': 100" in text and "'maxItems': 1000" in text and "'maxItems': 10000" in text
    settings = RecsysSettings()
    for path in ("/recommend", "/rank", "/score", "/model"):
        description = doc["paths"][path]["post"]["description"]
        assert f"at most {settings.max_body_bytes} bytes (413 above)" in description
        assert f"at most {settings.max_in_flight} requests in flight" in description


def test_probes_and_metrics(server: ServerProcess, client: bentoml.SyncHTTPClient) -> None:
    client.recommend(user_id="u1", k=2)
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(f"{server.url}{probe}", timeout=10).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "bentoml_service_request_total" in metrics and 'endpoint="/recommend"' in metrics


@pytest.fixture(params=["defaults", "renewing"])
def burst_server(request: pytest.FixtureRequest, trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    """The session's server (default settings), and one that renews its runner session every
    50 calls, so that a burst crosses many renewals."""
    if request.param == "defaults":
        yield request.getfixturevalue("server")
        return
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                        env={"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag),
                             "RECSYS_RUNNER_MAX_REQUESTS": "50"})  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def test_burst_of_concurrent_requests_has_no_errors(
    burst_server: ServerProcess, version: ModelVersion, local: Recommender
) -> None:
    """500 concurrent /recommend and 1-row /score requests through the API to the ranking
    service, each answered with exactly its own result: the API workers join concurrent
    scoring calls (models/serving/batching.py), so a slice handed to the wrong caller would show
    here. BentoML closes a renewed runner session with calls in flight (with renewal every 50
    calls, 503s); `retire_sessions_when_idle` closes it once idle (bentoml_patches.py)."""
    server = burst_server
    users = [str(u) for u in local.tables.user_ids[:60]]
    expected = {u: [x["item_id"] for x in expected_recommendation(version, local, u, 10, True)] for u in users}
    features = local.prepare_recommend(0, exclude_seen=True).features[:60]
    scores = predict_scores(version.load_booster(nthread=1), features)
    before = metric_values(httpx.get(f"{server.url}/metrics", timeout=10).text, "recsys_ranker_joined_requests")

    async def burst() -> list[str]:
        async with bentoml.AsyncHTTPClient(server.url, server_ready_timeout=30) as c:
            async def one(i: int) -> str:
                user, row = users[i % len(users)], i % len(features)
                try:
                    if i % 2:
                        got = (await c.score(rows=[dict(zip(FEATURE_NAMES, map(float, features[row])))]))["scores"]
                        return "ok" if np.allclose(got, scores[row : row + 1], atol=1e-5) else f"wrong score, row {row}"
                    r = await c.recommend(user_id=user, k=10)
                except bentoml.exceptions.BentoMLException as err:
                    return f"error: {err}"
                return "ok" if [x["item_id"] for x in r["items"]] == expected[user] else f"wrong items for {user}"
            out: list[str] = []
            for _ in range(2):  # two waves of 250
                out += await asyncio.gather(*(one(i) for i in range(250)))
            return out

    started = time.monotonic()
    results = asyncio.run(burst())
    errors = [r for r in results if r != "ok"]
    assert not errors, f"{len(errors)} of {len(results)} failed, e.g. {errors[:3]}"
    assert time.monotonic() - started < 120
    after = metric_values(httpx.get(f"{server.url}/metrics", timeout=10).text, "recsys_ranker_joined_requests")
    requests, calls = after["sum"] - before["sum"], after["count"] - before["count"]
    assert requests == len(results), "every scoring request is counted once"
    assert calls < requests, f"no scoring calls were joined: {calls} calls for {requests} requests"


def test_metrics_survive_another_serve_process_on_the_same_home(
    server: ServerProcess, bentoml_home: Path, trained: TrainResult
) -> None:
    """BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a serve process starts,
    which erased the counts of the one already serving (models/serving/bentoml_patches.py)."""
    assert trained.tag is not None

    def served() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bentoml_service_request_total") and 'endpoint="/model"' in line)  # fmt: skip

    for _ in range(3):
        assert httpx.post(f"{server.url}/model", json={}, timeout=10).status_code == 200
    first = served()
    other = start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                         env={"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag})  # fmt: skip
    try:
        for _ in range(2):
            assert httpx.post(f"{server.url}/model", json={}, timeout=10).status_code == 200
        assert served() == first + 2
    finally:
        other.stop()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Sum over labels of a histogram's _sum and _count in Prometheus text."""
    out = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in out:
            if line.startswith(f"{name}_{part}"):
                out[part] += float(line.rsplit(" ", 1)[1])
    return out


def _truncate_booster(folder: Path) -> None:
    booster = folder / BOOSTER_FILE
    booster.write_bytes(booster.read_bytes()[:100])


def _change_schema_hash(folder: Path) -> None:
    model_yaml = folder / "model.yaml"
    text = model_yaml.read_text()
    assert SCHEMA_HASH in text
    model_yaml.write_text(text.replace(SCHEMA_HASH, "0123456789abcdef"))


@pytest.mark.parametrize(
    ("damage", "check"),
    [(_truncate_booster, f"digest check failed: {BOOSTER_FILE}"), (_change_schema_hash, "schema hash check failed")],
    ids=["truncated booster", "schema hash mismatch"],
)
def test_a_damaged_model_is_never_served(trained: TrainResult, tmp_path: Path, damage, check: str) -> None:  # type: ignore[no-untyped-def]
    """`serve` refuses to start (non-zero exit before any worker answers) with an error
    naming the model tag and the failed check."""
    assert trained.tag is not None
    name, ver = trained.tag.split(":")
    home = tmp_path / "home"
    dst = home / "models" / name / ver
    shutil.copytree(Path(bentoml.models.get(trained.tag).path), dst)
    (home / "models" / name / "latest").write_text(ver)
    damage(dst)
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                        env={"BENTOML_HOME": str(home), "RECSYS_MODEL_TAG": trained.tag}, wait=False)  # fmt: skip
    try:
        assert proc.proc.wait(timeout=60) != 0
        assert f"model {trained.tag}: {check}" in proc.log()
        assert "Traceback" not in proc.log(), proc.log()
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("registry_text", "says"),
    [("{not json", "unreadable registry file"), (None, "no champion")],
    ids=["damaged registry", "no champion"],
)
def test_serve_without_a_version_to_serve_exits_with_one_line_naming_the_registry(
    tmp_path: Path, registry_text: str | None, says: str
) -> None:
    """Not a traceback at import, nor BentoML's "model NAME:unresolved could not be found":
    the plan's problem, naming the registry file, and a non-zero exit."""
    home = tmp_path / "home"
    env = {"BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": DEFAULT_MODEL_NAME}
    path = home / registry_path(DEFAULT_MODEL_NAME).relative_to(store_home())  # the same layout in that home
    if registry_text is not None:
        path.parent.mkdir(parents=True)
        path.write_text(registry_text)
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env=env, wait=False)
    try:
        assert proc.proc.wait(timeout=60) != 0
        log = proc.log()
    finally:
        proc.stop()
    # The registry named: the JSON file of before that cannot be imported, else the
    # embedded MLflow registry of that home.
    named = path if registry_text is not None else home / "mlflow.db"
    errors = [line for line in log.splitlines() if str(named) in line]
    assert len(errors) == 1 and says in errors[0], log
    assert "Traceback" not in log, log
