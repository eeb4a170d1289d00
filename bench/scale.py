"""Training at scale: time and peak memory, in-process against Dask, at 1M, 5M and 25M
interactions of the partitioned synthetic generator (25M: the ml-25m shape of
`python -m training generate --shape ml-25m`, 162,541 users and 59,047 items).

    python -m bench.scale [--sizes 1000000 5000000 25000000] [--engines local dask] [--smoke]

Each run is `python -m training --dataset interactions ... --dry-run --json` in a process of
its own; peak memory is the largest sum of the resident memory of that process and all its
children (the Dask scheduler and workers included), sampled every 0.2 s. Writes
bench/results/scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = Path(__file__).resolve().parents[1]
USERS_PER_INTERACTION = 1 / 200  # 200 draws per user on average
ITEMS = {1_000_000: 5_000, 5_000_000: 12_000, 10_000_000: 20_000}
ML_25M = 25_000_000  # this size is generated in the ml-25m shape


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def run_training(args: list[str], home: Path) -> dict[str, Any]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "training", *args, "--dry-run", "--json"],
                                cwd=PROJECT, env=env, stdout=out, stderr=err)  # fmt: skip
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"training failed: {err.read().decode()[-3000:]}")
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "ndcg": result["metrics"]["model"]["ndcg"],
            "stages_s": result["timings_s"], "stages_peak_mb": result.get("peak_rss_mb", {})}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, ML_25M])
    p.add_argument("--engines", nargs="+", choices=("local", "dask"), default=["local"])
    p.add_argument("--data-root", type=Path, default=None,
                   help="keep generated data here (data-<size>/), and reuse what is there")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="20,000 interactions: checks the benchmark runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sizes = [20_000] if args.smoke else args.sizes
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="recsys-scale-") as tmp:
        for size in sizes:
            data = (args.data_root or Path(tmp)) / f"data-{size}"
            gen = time.perf_counter()
            users = 162_541 if size == ML_25M else max(200, int(size * USERS_PER_INTERACTION))
            shape = (["--shape", "ml-25m"] if size == ML_25M else
                     ["--n-users", str(users), "--n-items", str(ITEMS.get(size, 1000)), "--n-interactions", str(size),
                      "--partitions", str(max(2, size // 500_000))])  # fmt: skip
            if not (data / "items.parquet").exists():
                subprocess.run([sys.executable, "-m", "training", "generate", "--out", str(data), *shape], cwd=PROJECT,
                               check=True, capture_output=True)  # fmt: skip
            gen_s = time.perf_counter() - gen
            common = ["--dataset", "interactions", "--data", str(data / "interactions"), "--items",
                      str(data / "items.parquet"), "--time-col", "ts", "--rating-col", "rating"]  # fmt: skip
            for engine in args.engines:
                extra = ["--engine", "dask", "--dask-workers", "2"] if engine == "dask" else []
                r = run_training([*common, *extra], Path(tmp) / "home")
                rows.append({"interactions": size, "users": users, "engine": engine, "generate_s": gen_s, **r})
                print(f"{size:>11,} {engine:>5}: {r['seconds']:7.1f} s, peak {r['peak_rss_mb']:8.0f} MB, "
                      f"NDCG@10 {r['ndcg']:.4f}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scale_smoke" if args.smoke else "scale"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Training at scale ({os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB)", "",
             "| interactions | users | engine | time | peak memory | NDCG@10 | slowest stage |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        stage, secs = max(r["stages_s"].items(), key=lambda kv: kv[1])
        lines.append(f"| {r['interactions']:,} | {r['users']:,} | {r['engine']} | {r['seconds']:.0f} s | "
                     f"{r['peak_rss_mb']:,.0f} MB | {r['ndcg']:.4f} | {stage} ({secs:.0f} s) |")  # fmt: skip
    for r in rows:
        lines += ["", f"{r['interactions']:,} interactions ({r['engine']}): time and peak memory (this process) by stage",
                  "", "| stage | seconds | peak MB |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.1f} | {r['stages_peak_mb'].get(k, float('nan')):,.0f} |" for k, v in r["stages_s"].items()]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
