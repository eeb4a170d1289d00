"""A small async HTTP load generator (aiohttp), for benchmarks and load/fault tests.

Closed loop (`concurrency` clients, each sending its next request when the last one came
back) or, with `rate`, paced to that many requests per second. Bounded in time and count;
targets loopback addresses only. Reports throughput, latency percentiles, status counts,
errors and the generator's own CPU time (so one can see it is not the bottleneck).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np

BodyFactory = Callable[[int], dict[str, Any]]
# (start, end) in seconds since the run began, the status and the body of one response.
ResponseHook = Callable[[float, float, int, bytes], None]


def check_loopback(url: str) -> None:
    """Load only ever goes to this machine."""
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to send load to {host!r}: only loopback addresses are allowed")


@dataclass
class LoadResult:
    duration_s: float
    latencies_ms: np.ndarray
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    started_at: float = 0.0  # time.perf_counter() when the run began
    # (start, end) in seconds since the run began, and the status (-1: no response)
    timeline: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p95_ms": round(self.percentile(95), 2),
            "p99_ms": round(self.percentile(99), 2),
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "client_cpu_share": round(self.client_cpu_s / self.duration_s, 3) if self.duration_s else 0.0,
        }


async def run_load(
    url: str,
    make_body: BodyFactory,
    concurrency: int,
    duration_s: float,
    rate: float | None = None,
    max_requests: int | None = None,
    timeout_s: float = 35.0,
    headers: dict[str, str] | None = None,
    on_response: ResponseHook | None = None,
) -> LoadResult:
    """POST JSON bodies to `url` for `duration_s` (and at most `max_requests`); each answer
    also goes to `on_response` when given (a test that checks what every response says)."""
    check_loopback(url)
    # The generator's own pauses must not count as the server's latency: keep the garbage
    # collector off what is already alive (a benchmark process holds a model in memory).
    gc.collect()
    gc.freeze()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    timeline: list[tuple[float, float, int]] = []
    start = time.perf_counter()
    deadline = start + duration_s
    counter = 0
    next_slot = start
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout, headers=headers) as session:

        async def client() -> None:
            nonlocal counter, next_slot
            while True:
                now = time.perf_counter()
                if now >= deadline or (max_requests is not None and counter >= max_requests):
                    return
                if rate is not None:
                    slot, next_slot = next_slot, max(next_slot, now) + 1.0 / rate
                    if slot > now:
                        await asyncio.sleep(slot - now)
                        if time.perf_counter() >= deadline:
                            return
                i = counter
                counter += 1
                body = json.dumps(make_body(i)).encode()
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                        answer = await resp.read()
                        statuses[resp.status] += 1
                        code = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    errors[type(err).__name__] += 1
                    code = -1
                t1 = time.perf_counter()
                timeline.append((t0 - start, t1 - start, code))
                if on_response is not None and code != -1:
                    on_response(t0 - start, t1 - start, code, answer)
                if code == 200:
                    latencies.append((t1 - t0) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))

    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return LoadResult(
        duration_s=time.perf_counter() - start,
        latencies_ms=np.asarray(latencies),
        statuses=statuses,
        errors=errors,
        client_cpu_s=cpu,
        timeline=timeline,
        started_at=start,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.loadgen URL BODIES.jsonl --concurrency N --duration S [--rate R]`:
    POST the bodies (cycled) and print the result as JSON (the benchmark's own process)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("url")
    p.add_argument("bodies", help="a file of JSON bodies, one per line")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--warmup", type=float, default=0.0)
    args = p.parse_args(argv)
    with open(args.bodies) as fh:
        bodies = [json.loads(line) for line in fh if line.strip()]

    def body(i: int) -> dict[str, Any]:
        return bodies[i % len(bodies)]  # type: ignore[no-any-return]

    if args.warmup:
        asyncio.run(run_load(args.url, body, args.concurrency, args.warmup))
    result = asyncio.run(run_load(args.url, body, args.concurrency, args.duration, rate=args.rate))
    json.dump({"duration_s": result.duration_s, "latencies_ms": result.latencies_ms.tolist(),
               "statuses": result.statuses, "errors": result.errors, "client_cpu_s": result.client_cpu_s},
              sys.stdout)  # fmt: skip
    return 0


def load_from_json(data: dict[str, Any]) -> LoadResult:
    return LoadResult(
        duration_s=data["duration_s"],
        latencies_ms=np.asarray(data["latencies_ms"]),
        statuses=Counter({int(k): v for k, v in data["statuses"].items()}),
        errors=Counter(data["errors"]),
        client_cpu_s=data["client_cpu_s"],
    )


if __name__ == "__main__":
    raise SystemExit(main())
