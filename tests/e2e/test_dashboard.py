"""deploy/grafana/recsys.json: its shape (a `${datasource}` variable, no datasource uid written
in), and every metric name its PromQL queries is on a real server's /metrics after traffic.

The server is driven into every state the dashboard shows: a challenger in shadow mode, a
monitor folder that cannot be created, and a drift folder taken away after start-up, so the
error counters exist too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.core.schema import FEATURE_NAMES
from models.lifecycle import registry
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, small_synthetic, start_server
from training.pipeline import TrainConfig, train

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "recsys.json"
NAME = "dash-e2e"
# Series Prometheus makes itself when it scrapes: never on a /metrics page.
PROMETHEUS_SERIES = frozenset({"up"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.$:])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads,
    exactly as written: `x_bucket` stays `x_bucket`, to be found among the sample names."""
    if variable := re.fullmatch(r"\s*label_values\(\s*(?:(.*?)\s*,\s*)?\w+\s*\)\s*", expr, re.S):
        expr = variable.group(1) or ""  # label_values([metric,] label): the label is no metric
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes, $variables
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries ([$__rate_interval])
    text = _LABEL_LISTS.sub(" ", text)
    for match in _NAME.finditer(text):
        word = match.group()
        if word.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # functions and aggregations are followed by "("
        names.add(word)
    return names


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    found = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
             for p in walk_panels(dashboard["panels"]) for t in p.get("targets", [])]  # fmt: skip
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable ${var['name']}", query))
    return found


def missing_names(dashboard: dict[str, Any], exposed: set[str]) -> list[str]:
    """`where: name` for each queried name that is neither exposed nor Prometheus' own."""
    return sorted(f"{where}: {name}" for where, expr in queries(dashboard)
                  for name in metric_names(expr) - exposed - PROMETHEUS_SERIES)  # fmt: skip


def exposed_names(metrics_text: str) -> set[str]:
    """Sample names, with their suffixes (`_total`, `_bucket`, `_sum`, `_count`)."""
    return {s.name for family in text_string_to_metric_families(metrics_text) for s in family.samples}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (endpoint, http_response_code) (rate(bentoml_service_request_total{job=~"$job", '
     'endpoint!~"/(readyz|metrics)"}[$__rate_interval]))', {"bentoml_service_request_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(recsys_ranking_seconds_bucket[5m])))",
     {"recsys_ranking_seconds_bucket"}),
    ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > bool 1e3", {"a_sum", "a_count"}),
    ('x_total offset 5m unless on (job) up == 0', {"x_total", "up"}),
    ('sum without (pod) (rate(x_total{outcome!="not_a_metric"}[1m:10s]))', {"x_total"}),
    ('{__name__="by_name_total", job="j"}', {"by_name_total"}),
    ('label_values(recsys_drift_psi{job=~"$job"}, model_version)', {"recsys_drift_psi"}),
    ("label_values(job)", set()),
])  # fmt: skip
def test_metric_names_are_extracted_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_dashboard_takes_its_datasource_from_a_variable() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # Every datasource reference in the file is the variable: no instance's uid written in.
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())) - {dash["uid"], "-- Grafana --"}
    assert uids == {"${datasource}"}
    panels = list(walk_panels(dash["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_the_psi_thresholds_are_the_settings_defaults() -> None:
    """The dashboard's warn and alert colours mark RECSYS_DRIFT_WARN and RECSYS_DRIFT_ALERT."""
    fields = RecsysSettings.model_fields
    want = [fields["drift_warn"].default, fields["drift_alert"].default]
    psi_panels = [p for p in walk_panels(load_dashboard()["panels"])
                  if any("recsys_drift_psi" in t["expr"] for t in p.get("targets", []))]  # fmt: skip
    assert psi_panels
    for panel in psi_panels:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps[1:]] == want, panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """Prometheus' own parser on every target, Grafana's variables set as Grafana would."""
    values = {"$__rate_interval": "5m", "$job": ".*", "$model_version": ".*"}
    targets = [expr for where, expr in queries(load_dashboard()) if where.startswith("panel")]
    for variable, value in values.items():
        targets = [t.replace(variable, value) for t in targets]
    assert not [t for t in targets if "$" in t], "a Grafana variable this test does not set"
    rules = [{"record": f"dashboard:query{i}", "expr": t} for i, t in enumerate(targets)]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", "queries.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def degraded_server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[tuple[ServerProcess, Path]]:  # fmt: skip
    """Champion and challenger in shadow mode; the monitor folder sits under a regular file
    (not creatable, even by root), so every monitor record is counted as dropped."""
    tags = [str(train(small_synthetic(seed), TrainConfig(tune_budget_s=0), model_name=NAME).tag) for seed in (3, 4)]
    registry.promote(tags[0])
    registry.promote(tags[1], "challenger")
    tmp = tmp_path_factory.mktemp("dashboard")
    (tmp / "a-file").write_text("")
    server = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_NAME": NAME, "RECSYS_CHALLENGER_MODE": "shadow",
        "RECSYS_MONITOR_DIR": str(tmp / "a-file" / "monitoring"), "RECSYS_MONITOR_SAMPLE": "1",
        "RECSYS_DRIFT_DIR": str(tmp / "drift"),
    })  # fmt: skip
    try:
        yield server, tmp / "drift"
    finally:
        server.stop()


def send_traffic(client: httpx.Client) -> None:
    row = dict.fromkeys(FEATURE_NAMES, 0.5)
    calls = [("/recommend", {"user_id": "u1", "k": 5}), ("/recommend", {"user_id": "someone-new"}),
             ("/rank", {"user_id": "u2", "item_ids": ["i1", "i2", "i3"]}), ("/score", {"rows": [row] * 3}),
             ("/score", {"rows": []}), ("/drift", {})]  # fmt: skip
    for path, body in calls:
        response = client.post(path, json=body)
        assert response.status_code in (200, 400), f"{path}: {response.status_code} {response.text[:300]}"


@pytest.fixture(scope="module")
def metrics_text(degraded_server: tuple[ServerProcess, Path]) -> str:
    """/metrics once every name the dashboard queries is there (or at the deadline)."""
    server, drift_dir = degraded_server
    wanted = {n for _, expr in queries(load_dashboard()) for n in metric_names(expr)} - PROMETHEUS_SERIES
    with httpx.Client(base_url=server.url, timeout=30) as client:
        send_traffic(client)
        # Take the drift folder away (a cleaner of /tmp would): the next flush fails, counted.
        shutil.rmtree(drift_dir, ignore_errors=True)
        drift_dir.write_text("")
        deadline = time.monotonic() + 60
        while True:
            client.post("/recommend", json={"user_id": "u3", "k": 5}).raise_for_status()
            text = client.get("/metrics").text
            if wanted <= exposed_names(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)


@pytest.mark.e2e
def test_every_queried_metric_is_on_the_server(metrics_text: str) -> None:
    missing = missing_names(load_dashboard(), exposed_names(metrics_text))
    assert not missing, "queried but not on /metrics:\n" + "\n".join(missing)


@pytest.mark.e2e
@pytest.mark.parametrize("expr", [
    "rate(recsys_responses_count[5m])",            # a wrong suffix
    "histogram_quantile(0.9, rate(recsys_ranking_seconds[5m]))",  # a histogram without _bucket
    'sum(rate(recsys_no_such_metric_total{endpoint="recommend"}[5m]))',  # a metric nobody exports
])  # fmt: skip
def test_a_panel_querying_a_missing_name_fails(metrics_text: str, expr: str) -> None:
    dash = load_dashboard()
    dash["panels"].append({"id": 999, "type": "timeseries", "title": "bad", "targets": [{"refId": "A", "expr": expr}]})
    assert missing_names(dash, exposed_names(metrics_text)) == [f"panel 'bad' target A: {metric_names(expr).pop()}"]
