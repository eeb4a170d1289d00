"""Kubernetes manifests for the two services, rendered from their declarations in
service.py (workers, resources, timeouts), so they cannot drift from the code:

    python -m deploy.render --image registry.example.com/recsys:VERSION > deploy/k8s/recsys.yaml

Both Deployments run the same image (`bentoml containerize`), each serving one service
(see `server_args`): the ranking service, and the API service pointed at the ranking
Service by RECSYS_RANKER_URLS. Each has a Service and a
HorizontalPodAutoscaler, probes on /readyz and /livez, and runs as BentoML's non-root user.
The internal hop is closed twice: both read RECSYS_RANKER_TOKEN from the Secret
`recsys-ranker-token` (key `token`; create it with
`kubectl create secret generic recsys-ranker-token --from-literal=token=$(openssl rand -hex 32)`),
and a NetworkPolicy lets only the API pods (and Prometheus, for /metrics) reach the
ranking pods. Both read MLFLOW_TRACKING_URI, the shared MLflow registry whose aliases say
which versions they serve, from the ConfigMap `recsys-registry` (key `MLFLOW_TRACKING_URI`;
point it at your tracking server): a promotion reaches the pods without a new image.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

# Where `bentoml containerize` puts things (bentoml/_internal/container/generate.py).
BENTO_UID = 1034
PORT = 3000
DEFAULT_IMAGE = "recsys:latest"
TOKEN_SECRET = "recsys-ranker-token"
REGISTRY_CONFIGMAP = "recsys-registry"
DEFAULT_TRACKING_URI = "http://mlflow:5000"  # an `mlflow server` Service in the namespace; edit the ConfigMap
RANKER, API = "recsys-ranker", "recsys-api"
# Pods that may scrape the ranking pods' /metrics (any namespace).
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus"}


def server_args(service_name: str) -> list[str]:
    """Container arguments that serve one service of the Bento: the image's entrypoint turns
    `start-http-server ...` into `python -m bentoml_cli._internal.start start-http-server ...
    $BENTO_PATH`, BentoML's own way to run one service of a Bento per process (what its
    cloud does), which serves none of the services it depends on."""
    name = [] if service_name == "ApiService" else ["--service-name", service_name]
    return ["start-http-server", *name, "--host", "0.0.0.0", "--port", str(PORT)]


def _deployment(name: str, service: Any, image: str, env: dict[str, str], replicas: int) -> dict[str, Any]:
    config = service.config
    resources = config.get("resources", {})
    args = server_args(service.name)
    timeout = int(config.get("traffic", {}).get("timeout", 30))
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "recsys"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "recsys"}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": BENTO_UID, "runAsGroup": BENTO_UID,
                                        "fsGroup": BENTO_UID},  # fmt: skip
                    "terminationGracePeriodSeconds": timeout + 10,
                    "containers": [{
                        "name": name,
                        "image": image,
                        "args": args,
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "env": [{"name": k, "value": v} for k, v in
                                {"BENTOML_DO_NOT_TRACK": "true", **env}.items()] + [_token_env(), _registry_env()],
                        "resources": {
                            "requests": {"cpu": str(resources.get("cpu", "1")), "memory": str(resources.get("memory", "1Gi"))},
                            "limits": {"memory": str(resources.get("memory", "1Gi"))},
                        },
                        "readinessProbe": {**probe, "httpGet": {"path": "/readyz", "port": "http"}},
                        "livenessProbe": {**probe, "httpGet": {"path": "/livez", "port": "http"},
                                          "initialDelaySeconds": 30, "failureThreshold": 3},  # fmt: skip
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }


def _token_env() -> dict[str, Any]:
    """The internal token from its Secret; optional, so that the manifests apply before the
    Secret exists (then the hop is open, as it is without RECSYS_RANKER_TOKEN)."""
    return {"name": "RECSYS_RANKER_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token", "optional": True}}}  # fmt: skip


def _registry_env() -> dict[str, Any]:
    """The shared registry's URI from its ConfigMap; not optional: a pod without it would
    read an empty registry of its own and serve nothing."""
    return {"name": "MLFLOW_TRACKING_URI",
            "valueFrom": {"configMapKeyRef": {"name": REGISTRY_CONFIGMAP, "key": "MLFLOW_TRACKING_URI"}}}  # fmt: skip


def _registry_configmap() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": REGISTRY_CONFIGMAP, "labels": {"app.kubernetes.io/part-of": "recsys"}},
            "data": {"MLFLOW_TRACKING_URI": DEFAULT_TRACKING_URI}}  # fmt: skip


def _ranker_network_policy() -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": RANKER, "labels": {"app.kubernetes.io/part-of": "recsys"}},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": RANKER}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/name": API}}},
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": PROMETHEUS_LABELS}},
                ],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
        },
    }  # fmt: skip


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},  # fmt: skip
    }


def _autoscaler(name: str, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                         "target": {"type": "Utilization", "averageUtilization": 70}}}],  # fmt: skip
        },
    }


def render(image: str = DEFAULT_IMAGE) -> list[dict[str, Any]]:
    import service

    docs: list[dict[str, Any]] = []
    for name, svc, env in (
        (RANKER, service.RankerService, {}),
        (API, service.ApiService, {"RECSYS_RANKER_URLS": f"http://{RANKER}:{PORT}"}),
    ):
        docs += [_deployment(name, svc, image, env, replicas=2), _service(name), _autoscaler(name, 2, 10)]
    return [_registry_configmap(), *docs, _ranker_network_policy()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.splitlines()[0])
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the image of `bentoml containerize` (default {DEFAULT_IMAGE})")
    args = p.parse_args(argv)
    sys.stdout.write("# Rendered by `python -m deploy.render` from service.py; do not edit by hand.\n")
    sys.stdout.write(yaml.safe_dump_all(render(args.image), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
