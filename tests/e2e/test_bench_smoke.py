"""The benchmarks run (tiny versions): they check that bench/ works, never its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_perf_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--smoke", "--skip-mlserver", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "perf.json").read_text())
    systems = {(c["system"], c["scenario"]) for c in report["cells"]}
    assert {("bentoml batching", "recommend"), ("bentoml no batching", "score1")} <= systems
    assert all(c["ok"] > 0 and c["failed"] == 0 for c in report["cells"])
    assert report["reference"]["recommend_rps"] > 0
    assert "| bar | measured | met |" in (tmp_path / "perf.md").read_text()
    assert (tmp_path / "perf.png").read_bytes()[:4] == b"\x89PNG"
