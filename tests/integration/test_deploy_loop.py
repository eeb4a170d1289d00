"""deploy/k8s/loop-cronjob.yaml: the closed loop's CronJob passes the Kubernetes 1.37 schemas
(strict), runs one look of the loop, never two at once, and reads the registry and the
settings it names from where the serving pods read them."""

from __future__ import annotations

import kubernetes_validate
import yaml

from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT

MANIFEST = PROJECT_ROOT / "deploy" / "k8s" / "loop-cronjob.yaml"
(CRONJOB,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
POD = CRONJOB["spec"]["jobTemplate"]["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


def test_the_cronjob_passes_the_kubernetes_schema() -> None:
    kubernetes_validate.validate(CRONJOB, "1.37.0", strict=True)


def test_the_cronjob_runs_one_look_at_a_time() -> None:
    assert CRONJOB["spec"]["concurrencyPolicy"] == "Forbid"
    assert CONTAINER["command"][:5] == ["python", "-m", "training", "loop", "--once"]
    assert POD["securityContext"]["runAsNonRoot"] is True


def test_the_cronjob_reads_the_shared_registry_and_only_settings_that_exist() -> None:
    env = {e["name"]: e for e in CONTAINER["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {"name": "recsys-registry", "key": "MLFLOW_TRACKING_URI"}
    fields = {f"RECSYS_{name.upper()}" for name in RecsysSettings.model_fields}
    recsys = {name for name in env if name.startswith("RECSYS_")}
    assert recsys <= fields, recsys - fields  # a misspelt setting would be ignored silently
    values = {k: v["value"] for k, v in env.items() if "value" in v and k.startswith("RECSYS_")}
    RecsysSettings(**{k.removeprefix("RECSYS_").lower(): v for k, v in values.items()})  # they parse
