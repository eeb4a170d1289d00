"""A 60-second soak (bench/soak.py runs the 10-minute one): 0 errors at ~70% of
saturation, and server memory that stops growing after warm-up."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bench.soak import MAX_RSS_GROWTH, soak
from tests.helpers import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_soak_60s(server: ServerProcess) -> None:
    report = soak(server.url, server.proc.pid, duration_s=60, warmup_s=15)
    print(f"\nsoak: {asdict(report)}")
    assert report.errors == 0, f"{report.errors} failed requests: {report.failures}"
    # The load really was applied: half the target is enough to say so (the machine is
    # shared, and the target came from a 5-second probe).
    assert report.achieved_rps >= 0.5 * report.target_rps, f"load not applied: {asdict(report)}"
    assert report.rss_growth <= MAX_RSS_GROWTH, f"server memory grew {report.rss_growth:.1%}: {asdict(report)}"
