"""deploy/k8s: the committed manifests are what `python -m deploy.render` makes from the
service declarations, and they pass the Kubernetes 1.37 schemas (strict: no unknown
fields), offline with kubernetes-validate."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.render import render, server_args
from tests.helpers import PROJECT_ROOT

MANIFEST = PROJECT_ROOT / "deploy" / "k8s" / "recsys.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_committed_manifests_are_rendered_from_the_code() -> None:
    assert DOCS == render(), "deploy/k8s/recsys.yaml is stale: run `python -m deploy.render > deploy/k8s/recsys.yaml`"


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_manifest_passes_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_each_service_has_deployment_service_and_autoscaler() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in DOCS}
    for name in ("recsys-api", "recsys-ranker"):
        assert {("Deployment", name), ("Service", name), ("HorizontalPodAutoscaler", name)} <= kinds


@pytest.mark.parametrize(("name", "service_name"), [("recsys-ranker", "RankerService"), ("recsys-api", "ApiService")])
def test_deployment_follows_the_service_declaration(name: str, service_name: str) -> None:
    import service

    declared = getattr(service, service_name).config["resources"]
    (deployment,) = [d for d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"] == {"cpu": declared["cpu"], "memory": declared["memory"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["args"] == server_args(service_name)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    token = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "RECSYS_RANKER_TOKEN"]
    assert token == [{"name": "recsys-ranker-token", "key": "token", "optional": True}]
    registry = [e["valueFrom"]["configMapKeyRef"] for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
    assert registry == [{"name": "recsys-registry", "key": "MLFLOW_TRACKING_URI"}]  # promotions without a new image
    (configmap,) = [d for d in DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "recsys-registry"]
    assert configmap["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    if name == "recsys-api":  # the API finds the ranking Service by URL and spawns none
        assert env["RECSYS_RANKER_URLS"] == "http://recsys-ranker:3000"


def test_only_the_api_pods_and_prometheus_reach_the_ranking_pods() -> None:
    """The NetworkPolicy selects the ranking pods, allows ingress on the serving port from
    the API pods' labels (the labels their Deployment really gives them) and Prometheus."""
    from deploy.render import PORT, PROMETHEUS_LABELS

    (policy,) = [d for d in DOCS if d["kind"] == "NetworkPolicy"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in DOCS if d["kind"] == "Deployment"}

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector["matchLabels"].items())

    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert selects(policy["spec"]["podSelector"], pods["recsys-ranker"])
    assert not selects(policy["spec"]["podSelector"], pods["recsys-api"])
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": PORT}]
    sources = [s["podSelector"] for s in rule["from"]]
    assert any(selects(s, pods["recsys-api"]) for s in sources)
    assert not any(selects(s, pods["recsys-ranker"]) for s in sources)  # ranker pods are not callers
    assert {"matchLabels": PROMETHEUS_LABELS} in sources
