"""Champion and challenger in real servers: versions resolved from the registry (no tag
set), a 20% split by user hash, shadow mode, per-version metrics, and `replay` over the
request log the server wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest

from models.core.recommender import LocalRanker, Recommender
from models.lifecycle import registry
from models.lifecycle.store import open_version
from models.serving.variants import REQUEST_LOG, SHADOW_LOG, routes_to_challenger
from tests.helpers import PROJECT_ROOT, ServerProcess, small_synthetic, start_server
from training.pipeline import TrainConfig, train

pytestmark = pytest.mark.e2e
NAME = "lc-e2e"
SHARE = 0.2
USERS = [f"u{i}" for i in range(550)]


@pytest.fixture(scope="module")
def stages() -> dict[str, str]:
    tags = [str(train(small_synthetic(seed), TrainConfig(tune_budget_s=0), model_name=NAME).tag) for seed in (3, 4)]
    registry.promote(tags[0])
    registry.promote(tags[1], "challenger")
    return {"champion": tags[0], "challenger": tags[1]}


def serve(home: Path, monitor: Path, mode: str) -> ServerProcess:
    return start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": NAME, "RECSYS_CHALLENGER_MODE": mode,
        "RECSYS_CHALLENGER_SHARE": str(SHARE), "RECSYS_REQUEST_LOG_SAMPLE": "1",
        "RECSYS_MONITOR_DIR": str(monitor), "RECSYS_MONITOR_SAMPLE": "0",
    })  # fmt: skip


@pytest.fixture(scope="module")
def split_traffic(stages: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """One /recommend per user, then the same users again, on a split server."""
    monitor = tmp_path_factory.mktemp("split-monitor")
    server = serve(bentoml_home, monitor, "split")
    try:
        with bentoml.SyncHTTPClient(server.url) as client:
            first = {u: client.recommend(user_id=u, k=10) for u in USERS}
            again = {u: client.recommend(user_id=u, k=10)["variant"] for u in USERS[:200]}
            info = client.model_info()
            drift = client.drift_status()
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        yield {"first": first, "again": again, "info": info, "drift": drift, "metrics": metrics, "monitor": monitor}
    finally:
        server.stop()


def test_split_routes_a_stable_share_of_users_by_hash(split_traffic: dict[str, Any], stages: dict[str, str]) -> None:
    first = split_traffic["first"]
    share = sum(r["variant"] == "challenger" for r in first.values()) / len(first)
    assert abs(share - SHARE) <= 0.06, share  # 4 sd of a 20% draw over 550 users
    for user, response in first.items():
        expected = "challenger" if routes_to_challenger(user, SHARE, "recsys") else "champion"
        assert response["variant"] == expected, user
        assert response["model_tag"] == stages[expected]
    assert all(split_traffic["again"][u] == first[u]["variant"] for u in split_traffic["again"])


def test_model_info_and_metrics_name_both_versions(split_traffic: dict[str, Any], stages: dict[str, str]) -> None:
    info = split_traffic["info"]
    assert info["tag"] == stages["champion"] and info["challenger"]["tag"] == stages["challenger"]
    assert info["routing"] == {"mode": "split", "challenger_share": SHARE}
    drift = split_traffic["drift"]  # each version against its own reference profile
    assert drift["model_version"] == stages["champion"]
    assert drift["challenger"]["model_version"] == stages["challenger"]
    counts = {v: sum(r["variant"] == v for r in split_traffic["first"].values()) + sum(
        x == v for x in split_traffic["again"].values()) for v in ("champion", "challenger")}  # fmt: skip
    for variant, tag in stages.items():
        line = f'recsys_responses_total{{endpoint="recommend",model_version="{tag}",variant="{variant}"}}'
        value = next(float(x.split()[-1]) for x in split_traffic["metrics"].splitlines() if x.startswith(line))
        assert value == counts[variant]


def read_jsonl(folder: Path, expected: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for p in sorted(folder.glob("data.*.log*"))
                   for line in p.read_text().splitlines() if line.strip()]  # fmt: skip
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def run_replay(args: list[str], home: Path) -> dict[str, Any]:
    env = {**os.environ, "BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": NAME}
    out = subprocess.run([sys.executable, "-m", "training", "replay", "--json", *args], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_replay_of_the_logged_requests(split_traffic: dict[str, Any], stages: dict[str, str], bentoml_home: Path) -> None:
    served = sum(r["variant"] == "champion" for r in split_traffic["first"].values()) + sum(
        v == "champion" for v in split_traffic["again"].values())  # fmt: skip
    logged = read_jsonl(split_traffic["monitor"] / REQUEST_LOG / "data", len(split_traffic["first"]) + 200)
    assert sum(r["model_version"] == stages["champion"] for r in logged) == served
    other = run_replay(["--logs", str(split_traffic["monitor"])], bentoml_home)
    assert other["challenger"] == stages["challenger"]
    rec = other["endpoints"]["recommend"]
    assert rec["requests"] == served and 0.0 <= rec["overlap_at_10"] < 1.0 and rec["latency_ms"]["p50"] > 0
    # The champion against itself agrees completely: the replay recomputes what was served.
    same = run_replay(["--logs", str(split_traffic["monitor"]), "--challenger", "champion"], bentoml_home)
    assert same["endpoints"]["recommend"]["overlap_at_10"] == 1.0
    assert same["endpoints"]["recommend"]["rank_correlation"] == pytest.approx(1.0)


def test_shadow_mode_never_changes_a_response(stages: dict[str, str], bentoml_home: Path, tmp_path: Path) -> None:
    champion = open_version(stages["champion"])
    local = LocalRanker(Recommender.of(champion), champion.load_booster(nthread=1))
    items = [f"i{i}" for i in range(0, 60, 3)]
    server = serve(bentoml_home, tmp_path, "shadow")
    try:
        with bentoml.SyncHTTPClient(server.url) as client:
            for user in USERS[:60]:
                rec = client.recommend(user_id=user, k=10)
                assert (rec["model_tag"], rec["variant"]) == (stages["champion"], "champion")
                assert [i["item_id"] for i in rec["items"]] == local.recommend(user, 10, True)
                ranked = client.rank(user_id=user, item_ids=items)
                assert [i["item_id"] for i in ranked["items"]] == local.rank(user, items)
        shadows = read_jsonl(tmp_path / SHADOW_LOG / "data", 120)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    assert len(shadows) == 120
    assert {(s["champion_version"], s["challenger_version"]) for s in shadows} == {tuple(stages.values())}
    recommend_shadows = [s for s in shadows if s["endpoint"] == "recommend"]
    assert all(s["champion_items"] == local.recommend(s["user_id"], 10, True) for s in recommend_shadows)
    assert any(s["challenger_items"] != s["champion_items"] for s in recommend_shadows)  # it did rank
    assert f'recsys_shadow_total{{model_version="{stages["challenger"]}",outcome="ok"}} 120.0' in metrics
