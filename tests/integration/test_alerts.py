"""deploy/prometheus/alerts.yml: promtool's syntax check and its unit tests on synthetic series
(alerts_test.yml), proof that those unit tests catch a wrong rule, and the thresholds that
must agree with the service's settings."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT

RULES_DIR = PROJECT_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run installs it as root)",
)
REQUIRED_ALERTS = {
    "RecsysTargetDown", "RecsysApiAbsent", "RecsysHighErrorRate", "RecsysHighP99Latency",
    "RecsysRankerCallsFailing", "RecsysRankerUnreachable", "RecsysDriftAlert",
    "RecsysDriftCountingImpaired", "RecsysMonitorLogRecordsDropped",
}  # fmt: skip


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    return {r["alert"]: r for group in doc["groups"] for r in group["rules"]}


@needs_promtool
def test_the_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "alerts.yml", cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


@needs_promtool
def test_the_rules_pass_their_unit_tests() -> None:
    out = promtool("test", "rules", "alerts_test.yml", cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
@pytest.mark.parametrize(("broken", "fixed"), [
    (">= 0.25", ">= 0.3"),                  # the drift threshold: a PSI of 0.25 no longer fires
    ("for: 30m", "for: 40m"),               # drift that lasted 35 minutes no longer fires
    ('outcome!="ok"}[5m])) > 0', 'outcome!="ok"}[5m])) > 100'),  # unreachable ranker missed
    ('endpoint!~"/(readyz|livez|healthz|metrics)", http_response_code', 'http_response_code'),  # probes counted
    ("> 0.25", "> 1"),                      # the p99 bound
], ids=["drift-threshold", "drift-for", "ranker-unreachable", "probes-counted", "p99-bound"])  # fmt: skip
def test_the_unit_tests_catch_a_wrong_rule(tmp_path: Path, broken: str, fixed: str) -> None:
    """Each mutation of alerts.yml must fail alerts_test.yml: its cases are not vacuous."""
    text = (RULES_DIR / "alerts.yml").read_text()
    assert broken in text, f"mutation target {broken!r} not in alerts.yml"
    (tmp_path / "alerts.yml").write_text(text.replace(broken, fixed, 1))
    shutil.copy(RULES_DIR / "alerts_test.yml", tmp_path)
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0, f"alerts_test.yml still passes with {broken!r} -> {fixed!r}"


def test_every_required_alert_has_for_severity_summary_and_description() -> None:
    found = rules()
    assert REQUIRED_ALERTS <= set(found), f"missing: {REQUIRED_ALERTS - set(found)}"
    for name, rule in found.items():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_drift_alert_fires_at_the_settings_alert_threshold() -> None:
    """One fact: /drift's 'alert' status (RECSYS_DRIFT_ALERT's default) is the alert's PSI."""
    threshold = re.search(r">=\s*([0-9.]+)\s*$", rules()["RecsysDriftAlert"]["expr"].strip())
    assert threshold is not None
    assert float(threshold.group(1)) == RecsysSettings.model_fields["drift_alert"].default
