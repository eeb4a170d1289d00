"""Soak: `/recommend` at ~70% of its measured saturation for a while, counting errors and
watching the resident memory of every server process.

    python -m bench.soak --url http://127.0.0.1:3000 --pid <bentoml serve PID> --duration 600

Passes with 0 errors and RSS growth of at most 10% after warm-up. CI runs a 60-second
version (tests/e2e/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from statistics import median

import psutil

from bench.loadgen import check_loopback, run_load

MAX_RSS_GROWTH = 0.10


@dataclass
class SoakReport:
    saturation_rps: float
    target_rps: float
    achieved_rps: float
    requests: int
    errors: int
    p99_ms: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_growth: float
    duration_s: float
    failures: dict[str, int]  # non-200 statuses and client errors, by kind

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.rss_growth <= MAX_RSS_GROWTH


def server_rss_mb(pid: int) -> float:
    """Resident memory of the serve process and all its workers."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def body(i: int) -> dict[str, object]:
    return {"user_id": f"u{i % 500}", "k": 10}


def soak(url: str, pid: int, duration_s: float, warmup_s: float, load_share: float = 0.7) -> SoakReport:
    check_loopback(url)
    if duration_s <= warmup_s + 5:
        raise ValueError(f"duration {duration_s} s leaves no time after the {warmup_s} s warm-up to watch memory")
    endpoint = f"{url}/recommend"
    probe = asyncio.run(run_load(endpoint, body, concurrency=16, duration_s=5))
    if probe.ok == 0:
        raise RuntimeError(f"{endpoint} answered no request while measuring saturation: {probe.summary()}")
    saturation = probe.rps
    target = saturation * load_share
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(1.0):
            samples.append((time.monotonic() - start, server_rss_mb(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = asyncio.run(run_load(endpoint, body, concurrency=32, duration_s=duration_s, rate=target))
    stop.set()
    sampler.join()
    after_warmup = [rss for t, rss in samples if t >= warmup_s]
    if len(after_warmup) < 2:
        raise RuntimeError(
            f"only {len(after_warmup)} memory samples after the {warmup_s} s warm-up ({len(samples)} "
            f"in all over {result.duration_s:.1f} s): the machine is too busy to judge"
        )
    # median of the first and of the last few samples after warm-up: robust to one GC blip
    base = median(after_warmup[:5])
    end = median(after_warmup[-5:])
    return SoakReport(
        saturation_rps=round(saturation, 1),
        target_rps=round(target, 1),
        achieved_rps=round(result.rps, 1),
        requests=result.sent,
        errors=result.failed,
        p99_ms=round(result.percentile(99), 2),
        rss_after_warmup_mb=round(base, 1),
        rss_end_mb=round(end, 1),
        rss_growth=round((end - base) / base, 4),
        duration_s=round(result.duration_s, 1),
        failures={**{f"status {c}": n for c, n in result.statuses.items() if c != 200}, **result.errors},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--pid", type=int, required=True, help="PID of `bentoml serve`")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--warmup", type=float, default=60.0)
    args = p.parse_args(argv)
    report = soak(args.url, args.pid, args.duration, args.warmup)
    print(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
