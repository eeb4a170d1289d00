"""Live reload in real servers: a running `bentoml serve` follows the registry's stages
(promote, rollback) with no restart; a version that fails its checks is never switched in;
the two services never score one version's features with another's booster; and under 64
clients a promotion and a rollback cost no request."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest

from bench.loadgen import run_load
from models.core.ranking import predict_scores
from models.core.schema import FEATURE_NAMES
from models.lifecycle import registry
from models.lifecycle.store import BOOSTER_FILE, open_version
from tests.helpers import PROJECT_ROOT, ServerProcess, poll_until, small_synthetic, start_server
from training.pipeline import TrainConfig, train

pytestmark = pytest.mark.e2e
NAME = "reload-e2e"
SWITCH_WITHIN_S = 10.0  # the bar: a promotion reaches every worker within 10 s
ADMIN_KEY = "admin-e2e-key"
SERVED = re.compile(r'^recsys_model_served\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.MULTILINE)
RELOADS = re.compile(r'^recsys_model_reload_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def versions() -> list[str]:
    """Three versions of NAME trained on different data; the first is the champion."""
    tags = [str(train(small_synthetic(seed), TrainConfig(tune_budget_s=0), model_name=NAME).tag) for seed in (3, 4, 5)]
    registry.promote(tags[0])
    return tags


def _labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def served(server: ServerProcess) -> dict[str, set[str]]:
    """From /metrics: per service, the champions its worker processes serve (value 1)."""
    out: dict[str, set[str]] = {}
    for m in SERVED.finditer(httpx.get(f"{server.url}/metrics", timeout=10).text):
        labels = _labels(m["labels"])
        if float(m["value"]) == 1 and labels["role"] == "champion":
            out.setdefault(labels["service"], set()).add(labels["model_version"])
    return out


def reloads(server: ServerProcess, result: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(m["value"]) for m in RELOADS.finditer(text) if _labels(m["labels"]).get("result") == result)


def model_tags_seen(server: ServerProcess, n: int = 12) -> set[str]:
    """/model's tag from `n` fresh connections (a connection sticks to one worker)."""
    return {httpx.post(f"{server.url}/model", json={}, timeout=10).json()["tag"] for _ in range(n)}


def serve(home: Path, **env: str) -> ServerProcess:
    return start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": NAME, "RECSYS_ADMIN_KEYS": ADMIN_KEY,
        "RECSYS_MONITOR_SAMPLE": "0", "RECSYS_REQUEST_LOG_SAMPLE": "0", **env,
    })  # fmt: skip


@pytest.fixture(scope="module")
def server(versions: list[str], bentoml_home: Path) -> Iterator[ServerProcess]:
    """One serve with the default polling interval, two API workers beside the ranking one."""
    proc = serve(bentoml_home)
    try:
        yield proc
    finally:
        proc.stop()


def wait_switch(server: ServerProcess, tag: str) -> float:
    """Seconds until every worker of both services serves `tag` (by /metrics) and /model
    names it on fresh connections; fails past SWITCH_WITHIN_S."""
    start = time.monotonic()
    poll_until(lambda: served(server), SWITCH_WITHIN_S, f"every worker serves {tag}",
               lambda s: s.get("api") == {tag} and s.get("ranker") == {tag}, interval=0.25)  # fmt: skip
    poll_until(lambda: model_tags_seen(server), SWITCH_WITHIN_S - (time.monotonic() - start),
               f"/model names {tag}", lambda seen: seen == {tag}, interval=0.25)  # fmt: skip
    return time.monotonic() - start


def test_promote_then_rollback_reach_the_running_server(server: ServerProcess, versions: list[str]) -> None:
    first, second = versions[0], versions[1]
    assert model_tags_seen(server) == {first}
    pid = server.proc.pid
    registry.promote(second, reason="e2e reload")
    took = wait_switch(server, second)
    with bentoml.SyncHTTPClient(server.url) as client:
        answer = client.recommend(user_id="u1", k=5)
        info = client.model_info()
        drift = client.drift_status()
    assert (answer["model_tag"], answer["variant"]) == (second, "champion")
    assert drift["model_version"] == second  # drift counting follows the switch
    assert info["reload"]["follows"] and info["reload"]["last_attempt"]["result"] in ("switched", None)
    registry.rollback(NAME, reason="e2e reload")
    took_back = wait_switch(server, first)
    assert server.proc.pid == pid and server.proc.poll() is None  # no restart
    assert reloads(server, "switched") >= 2
    print(f"switch seen everywhere after {took:.1f} s (promote), {took_back:.1f} s (rollback)")


def test_a_version_that_fails_its_checks_is_not_switched_in(server: ServerProcess, versions: list[str]) -> None:
    good, bad = versions[0], versions[2]
    assert model_tags_seen(server) == {good}
    booster = Path(open_version(bad).path) / BOOSTER_FILE
    backup = booster.read_bytes()
    booster.write_bytes(backup[:100])  # truncated: the digest check fails
    failed_before = reloads(server, "failed")
    try:
        registry.promote(bad, reason="e2e damaged")
        poll_until(lambda: reloads(server, "failed"), SWITCH_WITHIN_S, "the failed reload counted",
                   lambda n: n > failed_before)  # fmt: skip
        # The worker that answered may not have tried yet: ask until one that did answers.
        info = poll_until(lambda: httpx.post(f"{server.url}/model", json={}, timeout=10).json(), SWITCH_WITHIN_S,
                          "/model shows the refusal", lambda i: bool(i["reload"]["refused"]))  # fmt: skip
        attempt = info["reload"]["last_attempt"]
        assert info["tag"] == good and attempt["result"] == "failed"
        assert f"digest check failed: {BOOSTER_FILE}" in attempt["error"] and bad in info["reload"]["refused"]
        answer = httpx.post(f"{server.url}/recommend", json={"user_id": "u1", "k": 5}, timeout=10)
        assert answer.status_code == 200 and answer.json()["model_tag"] == good
        lines = [line for line in server.log().splitlines() if "not switching to champion " + bad in line]
        assert lines and all(f"still serving champion {good}" in line for line in lines), server.log()[-3000:]
        assert "Traceback" not in server.log()
        # Repaired, it is tried again on the admin endpoint (which takes the admin key only).
        booster.write_bytes(backup)
        refused = httpx.post(f"{server.url}/admin/reload", json={}, timeout=10)
        assert refused.status_code == 401
        forced = httpx.post(f"{server.url}/admin/reload", json={}, timeout=30,
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
        assert forced.status_code == 200 and forced.json()["last_attempt"]["result"] == "switched", forced.text
    finally:
        booster.write_bytes(backup)
        registry.rollback(NAME, reason="e2e damaged")
    wait_switch(server, good)


def _scores(tag: str, rows: list[dict[str, float]]) -> np.ndarray:
    matrix = np.array([[r[f] for f in FEATURE_NAMES] for r in rows], dtype=np.float32)
    return predict_scores(open_version(tag).load_booster(1), matrix)


def test_the_services_never_mix_versions(versions: list[str], bentoml_home: Path, tmp_path: Path) -> None:
    """A ranking service held at version A (reload off) behind an API pinned at B: every
    score is B's booster's (the ranking service loads B when first named). One whose store
    lacks B refuses (503), never scoring B's features with A's booster."""
    a, b = versions[0], versions[1]
    rng = np.random.default_rng(1)
    rows = [dict(zip(FEATURE_NAMES, map(float, rng.random(len(FEATURE_NAMES))))) for _ in range(8)]
    want, other = _scores(b, rows), _scores(a, rows)
    assert not np.allclose(want, other)  # the test can tell the boosters apart
    lone = tmp_path / "home"  # a store with A only
    name, ver = a.split(":")
    shutil.copytree(Path(open_version(a).path), lone / "models" / name / ver)
    (lone / "models" / name / "latest").write_text(ver)
    for home, holds_b in ((bentoml_home, True), (lone, False)):
        ranker = start_server(["service:RankerService"], cwd=PROJECT_ROOT, env={
            "BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": NAME, "RECSYS_MODEL_TAG": a, "RECSYS_RELOAD_INTERVAL_S": "0",
        })  # fmt: skip
        api: ServerProcess | None = None
        try:
            api = serve(bentoml_home, RECSYS_MODEL_TAG=b, RECSYS_RANKER_URLS=ranker.url)
            for _ in range(3):
                resp = httpx.post(f"{api.url}/score", json={"rows": rows}, timeout=30)
                if holds_b:
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["model_tag"] == b
                    np.testing.assert_allclose(resp.json()["scores"], want, rtol=1e-5)
                else:
                    assert resp.status_code == 503, resp.text
            tags = httpx.post(f"{ranker.url}/model_tags", json={}, timeout=10).json()
            assert tags["champion"] == a and (b in tags["held"]) == holds_b
            if not holds_b:
                assert "which this ranking service does not hold" in ranker.log(), ranker.log()[-3000:]
        finally:
            for proc in (api, ranker):
                if proc is not None:
                    proc.stop()


def test_promotion_and_rollback_under_load(server: ServerProcess, versions: list[str]) -> None:
    """64 clients on /recommend while a promotion and then a rollback happen: no failed
    request, every response names a version that was champion then, the switch in /model
    and in the metrics within 10 s."""
    first, second = versions[0], versions[1]
    assert model_tags_seen(server) == {first}
    answers: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()

    def record(t0: float, t1: float, status: int, body: bytes) -> None:
        tag = json.loads(body).get("model_tag", "") if status == 200 else ""
        with lock:
            answers.append((t0, t1, status, tag))

    marks: dict[str, float] = {}
    duration = 40.0
    result: dict[str, Any] = {}

    def load() -> None:
        marks["start"] = time.perf_counter()
        result["load"] = asyncio.run(run_load(
            f"{server.url}/recommend", lambda i: {"user_id": f"u{i % 500}", "k": 10}, concurrency=64,
            duration_s=duration, timeout_s=30,
            on_response=record,
        ))  # fmt: skip

    runner = threading.Thread(target=load)
    runner.start()
    try:
        time.sleep(6)
        marks["promote"] = time.perf_counter()
        registry.promote(second, reason="e2e under load")
        marks["promoted_seen"] = marks["promote"] + wait_switch(server, second)
        time.sleep(4)
        marks["rollback"] = time.perf_counter()
        registry.rollback(NAME, reason="e2e under load")
        marks["rolled_back_seen"] = marks["rollback"] + wait_switch(server, first)
    finally:
        runner.join(duration + 60)
    outcome = result["load"]
    t = {k: v - outcome.started_at for k, v in marks.items()}
    print(outcome.summary(), {k: round(v, 2) for k, v in t.items()})
    assert outcome.sent >= 5000, outcome.summary()
    assert outcome.failed == 0, outcome.summary()
    assert t["promoted_seen"] - t["promote"] <= SWITCH_WITHIN_S and t["rolled_back_seen"] - t["rollback"] <= SWITCH_WITHIN_S
    assert t["rolled_back_seen"] < duration - 5, "the rollback came too late in the run to be tested"
    for t0, t1, status, tag in answers:
        assert status == 200 and tag in (first, second), (t0, t1, status, tag)
        if tag == second:  # champion from the promotion to the rollback (and while workers switch back)
            assert t1 >= t["promote"] and t0 <= t["rolled_back_seen"], (t0, t1, tag, t)
        else:  # champion before the promotion (until every worker switched) and after the rollback
            assert t0 <= t["promoted_seen"] or t1 >= t["rollback"], (t0, t1, tag, t)
    assert {tag for *_, tag in answers} == {first, second}
