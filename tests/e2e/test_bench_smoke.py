"""The benchmarks run (tiny versions): they check that bench/ works, never its figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_perf_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--smoke", "--skip-mlserver", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "perf.json").read_text())
    systems = {(c["system"], c["scenario"]) for c in report["cells"]}
    assert {("bentoml batching", "recommend"), ("bentoml no batching", "score1")} <= systems
    assert all(c["ok"] > 0 and c["failed"] == 0 for c in report["cells"])
    reference = report["reference"]
    assert reference["recommend_rps"] > 0 and reference["whole_machine_processes"] >= 1
    # One process per core at once: more than one process alone, at most one per process.
    assert reference["recommend_rps"] < reference["recommend_rps_whole_machine"] or reference["whole_machine_processes"] == 1
    assert reference["hop_pickle_1rows_us"] > 0 and reference["hop_raw_f32_200rows_us"] > 0
    assert "| bar | measured | met |" in (tmp_path / "perf.md").read_text()
    assert (tmp_path / "perf.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_benchmark_smoke(tmp_path: Path) -> None:
    from bench.quality import BASELINES, MODEL, ORACLE

    out = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--smoke", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = (tmp_path / "quality.md").read_text()
    rows = {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}  # fmt: skip
    assert set(rows) == {"system", MODEL, *BASELINES, ORACLE}
    # NDCG, Recall, HitRate, MAP at 10 and candidate recall: one seed, so plain numbers.
    for system in (MODEL, *BASELINES, ORACLE):
        values = [float(v) for v in rows[system][:5]]
        assert all(0 <= v <= 1 for v in values), (system, values)
    # The generator's truth ranks better than what only counts items.
    assert float(rows[ORACLE][0]) > float(rows["popularity"][0])
    interval = re.search(r"ratio ([\d.]+) \[([\d.]+), ([\d.]+)\], difference ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", text)
    assert interval, text
    ratio, r_lo, r_hi, diff, d_lo, d_hi = map(float, interval.groups())
    assert r_lo <= ratio <= r_hi and d_lo <= diff <= d_hi
    report = json.loads((tmp_path / "quality.json").read_text())
    curves = report["datasets"]["synthetic"]["systems"][MODEL]["runs"][0]["ndcg_curve"]
    assert len(curves) == 50 and all(0 <= v <= 1 for v in curves)
    png = (tmp_path / "quality.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


def test_simulate_smoke(tmp_path: Path) -> None:
    """The replayer trains on a tiny base, serves it, replays what came after the cutoff:
    no failed request, hits counted, the service's own counters agree with the clicks sent."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.simulate", "--smoke", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "simulate.json").read_text())
    assert report["steps"] > 10 and report["failed"] == {}
    (served,) = report["summary"]
    assert served["variant"] == "champion" and 0 < served["hits"] <= served["steps"]
    counted = {(r["model_version"], r["variant"]): r for r in report["online_counters"]}
    mine = counted[(served["model_tag"], "champion")]
    assert mine["impressions"] == served["steps"] and mine["clicks"] == served["hits"]
    assert (tmp_path / "simulate.png").read_bytes()[:4] == b"\x89PNG"
def test_events_http_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.events_http", "--smoke", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "events_http.json").read_text())
    assert {(c["backend"], c["batch"]) for c in report["events"]} == {("sqlite", 100), ("sqlite", 1), ("redis", 100), ("redis", 1)}
    assert all(c["ok"] > 0 and c["failed"] == 0 for c in report["events"])
    assert all(p["on"]["ok"] > 0 and p["off"]["ok"] > 0 and p["ratio"] > 0 for p in report["pairs"])
    for load in ("half", "saturated"):
        fresh = report["freshness"][load]
        # Whatever the machine's speed: every acknowledged event shows in a later /recommend.
        assert fresh["probes"] == 10 and fresh["failed"] == 0 and fresh["unseen"] == 0, fresh
        assert 0 < fresh["p50_ms"] <= fresh["p99_ms"]
    assert len(report["bars"]) == 4 and "| bar | measured | met |" in (tmp_path / "events_http.md").read_text()
    assert (tmp_path / "events_http.png").read_bytes()[:4] == b"\x89PNG"
def test_rows_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.rows", "--smoke", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.loads((tmp_path / "rows_smoke.json").read_text())
    assert {r["lean"] for r in runs} == {True, False} and all(0 < r["ndcg"] <= 1 for r in runs)
    lean = next(r for r in runs if r["lean"])["training_rows"]
    assert lean["train_rows"] <= max(c["rows"] for c in lean["sampling_curve"])
    assert "| lean rows |" in (tmp_path / "rows_smoke.md").read_text()


def test_scale_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--smoke", "--engines", "local", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "scale_smoke.json").read_text())
    assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and 0 < row["ndcg"] <= 1
    assert set(row["stages_peak_mb"]) == set(row["stages_s"])
    assert "slowest stage" in (tmp_path / "scale_smoke.md").read_text()
