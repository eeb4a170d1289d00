"""Strict inputs on a real server: unknown fields, duplicate ids and values beyond float32
are 400s that name the field and the rule; a 400 is headed by the request it was about and
costs one log line (no traceback, no input values); /model and /drift answer GET too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models
from models.core.schema import FEATURE_NAMES
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
ROW = {name: 0.5 for name in FEATURE_NAMES}
SECRET = "value-that-must-not-be-logged"


def post(server: ServerProcess, route: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=30)


@pytest.mark.parametrize(
    ("route", "body", "loc", "rule"),
    [
        ("/recommend", {"user_id": "u1", "K": 5}, ["K"], "extra_forbidden"),
        ("/rank", {"user_id": "u1", "item_ids": ["i1"], "extra": 1}, ["extra"], "extra_forbidden"),
        ("/score", {"rows": [ROW], "model": "x"}, ["model"], "extra_forbidden"),
        ("/model", {"verbose": True}, ["verbose"], "extra_forbidden"),
        ("/drift", {"window": 60}, ["window"], "extra_forbidden"),
        ("/rank", {"user_id": "u1", "item_ids": ["i1", "i2", "i1"]}, ["item_ids"], "duplicate_item_ids"),
        ("/score", {"rows": [{**ROW, FEATURE_NAMES[0]: 3.5e38}]}, ["rows", 0, FEATURE_NAMES[0]], "less_than_equal"),
        ("/score", {"rows": [{**ROW, FEATURE_NAMES[1]: -3.5e38}]}, ["rows", 0, FEATURE_NAMES[1]], "greater_than_equal"),
    ],
    ids=["unknown-recommend", "unknown-rank", "unknown-score", "unknown-model", "unknown-drift", "duplicates", "float32-max", "float32-min"],
)
def test_bad_input_is_a_400_naming_field_and_rule(server: ServerProcess, route: str, body: object,
                                                  loc: list[object], rule: str) -> None:  # fmt: skip
    response = post(server, route, body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert any(d["loc"] == loc and d["type"] == rule for d in detail), detail
    assert response.json()["error"] == f"{len(detail)} validation error{'s' * (len(detail) != 1)} in the {route} request"


def test_duplicates_are_named(server: ServerProcess) -> None:
    response = post(server, "/rank", {"user_id": "u1", "item_ids": ["i1", "i2", "i1", "i2", "i3"]})
    assert "['i1', 'i2']" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("route", ["/model", "/drift"])
def test_read_only_apis_answer_get(server: ServerProcess, route: str) -> None:
    got = httpx.get(f"{server.url}{route}", timeout=30)
    posted = httpx.post(f"{server.url}{route}", timeout=30)
    assert got.status_code == posted.status_code == 200
    assert got.json().keys() == posted.json().keys()
    if route == "/model":
        assert got.json() == posted.json()


def test_openapi_names_the_version_and_the_get_operations(server: ServerProcess) -> None:
    doc = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    assert doc["info"]["version"] == models.__version__
    assert {"get", "post"} <= set(doc["paths"]["/drift"]) and {"get", "post"} <= set(doc["paths"]["/model"])
    assert "get" not in doc["paths"]["/recommend"]


@pytest.fixture(scope="module")
def json_logged(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag), "RECSYS_LOG_FORMAT": "json",
        "RECSYS_API_WORKERS": "1",
    })  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def test_a_client_error_is_one_json_log_line_without_values(json_logged: ServerProcess) -> None:
    before = json_logged.log().splitlines()
    for body in ({"user_id": SECRET, "k": 500}, {"user_id": SECRET, "K": 5}):
        assert post(json_logged, "/recommend", body).status_code == 400
    assert post(json_logged, "/recommend", {"user_id": "u1", "k": 3}).status_code == 200
    new = json_logged.log().splitlines()[len(before):]
    assert SECRET not in "\n".join(new)
    assert not [line for line in new if "Traceback" in line or "[ERROR]" in line], new
    records = [json.loads(line) for line in new if line.startswith("{")]
    client = [r for r in records if r.get("logger") == "recsys.client_errors"]
    assert [r["message"] for r in client] == ["POST /recommend 400: k (less_than_equal)",
                                              "POST /recommend 400: K (extra_forbidden)"], records  # fmt: skip
    assert all(r["level"] == "WARNING" for r in client)
