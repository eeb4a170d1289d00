"""Do big /score requests stall the small ones? The p99 of 1-row /score requests while one
client keeps sending 10,000-row requests to the same API worker, with the big requests'
matrix and drift counting off the event loop (the default, RECSYS_OFFLOAD_ROWS) and on it,
in alternating server rounds; on each server the small requests alone first, as the floor.
Each mode gets the same phases in the same order: a server that has just served a phase of
small requests alone answered the next phase with a worse p99, in trial runs.

    python -m bench.stall                # ~4 minutes; writes bench/results/stall.{md,png}
    python -m bench.stall --smoke        # seconds; checks that the benchmark works
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.loadgen import check_loopback
from bench.servers import start_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODES = {"offloaded": {}, "on the loop": {"RECSYS_OFFLOAD_ROWS": str(10**9)}}


def score_body(rows: int, seed: int) -> bytes:
    from models.core.schema import FEATURE_NAMES

    rng = np.random.default_rng(seed)
    values = rng.random((rows, len(FEATURE_NAMES))).round(4).tolist()
    return json.dumps({"rows": [dict(zip(FEATURE_NAMES, v)) for v in values]}).encode()


async def load(url: str, seconds: float, small_clients: int, big_rows: int | None) -> dict[str, float]:
    """Small requests from `small_clients` closed-loop clients (and one big-request client)
    for `seconds`; the small ones' latency percentiles and both request rates."""
    check_loopback(url)
    small = score_body(1, 0)
    big = score_body(big_rows, 1) if big_rows else None
    latencies: list[float] = []
    counts = {"small": 0, "big": 0, "failed": 0}
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(body: bytes, kind: str) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(f"{url}/score", data=body, headers=headers) as resp:
                    await resp.read()
                if resp.status != 200:
                    counts["failed"] += 1
                    continue
                counts[kind] += 1
                if kind == "small":
                    latencies.append((time.perf_counter() - t0) * 1000)

        jobs = [client(small, "small") for _ in range(small_clients)]
        if big is not None:
            jobs.append(client(big, "big"))
        await asyncio.gather(*jobs)
    lat = np.asarray(latencies)
    return {
        "small_rps": counts["small"] / seconds, "big_rps": counts["big"] / seconds, "failed": counts["failed"],
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
    }  # fmt: skip


def train_model(home: Path) -> str:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "training", "--n-users", "600", "--n-items", "400",
                          "--n-interactions", "30000", "--json"], cwd=ROOT, check=True,
                         env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True)  # fmt: skip
    return str(json.loads(out.stdout)["tag"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=12.0, help="per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating server pairs")
    p.add_argument("--big-rows", type=int, default=10_000)
    p.add_argument("--small-clients", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="1 round of 2 s: checks the benchmark works")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.big_rows = 2.0, 1, 2_000
    home = Path(tempfile.mkdtemp(prefix="recsys-stall-"))
    tag = train_model(home)
    base = {"BENTOML_HOME": str(home), "RECSYS_MODEL_TAG": tag, "RECSYS_API_WORKERS": "1",
            "RECSYS_DRIFT_DIR": str(home / "drift"), "RECSYS_MONITOR_DIR": str(home / "monitor")}  # fmt: skip
    rows: list[tuple[str, int, dict[str, float]]] = []
    for r in range(args.rounds):
        for mode, env in MODES.items():
            server = start_server(["service:ApiService"], cwd=ROOT, env={**base, **env})
            try:
                asyncio.run(load(server.url, 1.0, 2, None))  # warm-up
                rows.append((f"small alone ({mode})", r,
                             asyncio.run(load(server.url, args.seconds, args.small_clients, None))))  # fmt: skip
                rows.append((mode, r, asyncio.run(load(server.url, args.seconds, args.small_clients, args.big_rows))))
            finally:
                server.stop()
    table = report(rows, args)
    print(table)
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "stall.md").write_text(table + "\n")
        plot(RESULTS / "stall.png", rows)
        print(f"wrote {RESULTS / 'stall.md'} and {RESULTS / 'stall.png'}")
    return 0


def report(rows: list[tuple[str, int, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [f"1-row /score, {args.small_clients} clients, one API worker; beside them one client of "
             f"{args.big_rows}-row requests; {args.rounds} alternating rounds of {args.seconds:.0f} s",
             "", "| big requests | round | small p50 ms | small p99 ms | small req/s | big req/s | failed |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r, m in rows:
        lines.append(f"| {mode} | {r + 1} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['small_rps']:.0f} | "
                     f"{m['big_rps']:.1f} | {m['failed']:.0f} |")  # fmt: skip
    lines.append("")
    for mode in dict.fromkeys(m for m, _, _ in rows):
        p99 = [m["p99_ms"] for x, _, m in rows if x == mode]
        lines.append(f"- {mode}: small p99 median {np.median(p99):.1f} ms (range {min(p99):.1f}-{max(p99):.1f})")
    return "\n".join(lines)


def plot(path: Path, rows: list[tuple[str, int, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(m for m, _, _ in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, mode in enumerate(modes):
        p99 = [m["p99_ms"] for x, _, m in rows if x == mode]
        ax.scatter([i] * len(p99), p99, label=mode)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("p99 of 1-row /score, ms")
    ax.set_title("small requests beside big ones (each dot a round)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
