"""Lean training rows against full-candidate training: the quality bar of issue 18.

    python -m bench.rows [--interactions 1000000] [--seeds 42 43] [--smoke]

On the partitioned synthetic data of bench/scale.py's shape (200 draws per user), trains with
`lean_rows` on and off for each seed (the base ranker parameters, no tuning, so the two differ
by their rows only), and writes bench/results/rows.md and rows.json: NDCG@10 of both on the
test slice, time and peak memory by stage, and the curves the lean run chose on (rows
against validation NDCG, for the samplings and for the growing groups).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.datasets import interactions, write_synthetic
from training.pipeline import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
USERS_PER_INTERACTION = 1 / 200
ITEMS_PER_INTERACTION = 1 / 200


def run(dataset_dir: Path, seed: int, lean: bool, tune_budget_s: float) -> dict[str, Any]:
    dataset = interactions(dataset_dir / "interactions", user_col="user_id", item_col="item_id", time_col="ts",
                           rating_col="rating", items_path=dataset_dir / "items.parquet")  # fmt: skip
    # The lean run always searches (no full-rows budget), to be compared at any size.
    base = TrainConfig()
    config = replace(base, seed=seed, lean_rows=lean, tune_budget_s=tune_budget_s,
                     rows=replace(base.rows, full_rows_budget=0))  # fmt: skip
    start = time.perf_counter()
    result = train(dataset, config, save=False)
    seconds = time.perf_counter() - start
    meta = result.metadata
    return {
        "seed": seed, "lean": lean, "seconds": round(seconds, 1), "ndcg": result.metrics["model"]["ndcg"],
        "recall": result.metrics["model"]["recall"], "test_users": result.metrics["test_users"],
        "train_groups": meta["dataset"]["train_groups"], "timings_s": result.timings,
        "peak_rss_mb": result.peak_rss_mb, "training_rows": meta.get("training_rows"),
    }  # fmt: skip


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ({min(values):.4f}–{max(values):.4f})"


def report(rows: list[dict[str, Any]], n: int) -> str:
    lean = [r for r in rows if r["lean"]]
    full = [r for r in rows if not r["lean"]]
    lines = [f"# Lean training rows against full-candidate training ({n:,} interactions)", "",
             "| training | seeds | NDCG@10 mean (min–max) | train rows | time | peak memory | ranker stages |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, group in (("full candidates", full), ("lean rows", lean)):
        if not group:
            continue
        fit = [sum(v for k, v in r["timings_s"].items() if "rows" in k or "fit" in k) for r in group]
        train_rows = [r["training_rows"]["train_rows"] if r["training_rows"] else None for r in group]
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in group)} | {_spread([r['ndcg'] for r in group])} | "
            f"{', '.join(f'{t:,}' if t else 'all' for t in train_rows)} | "
            f"{statistics.fmean(r['seconds'] for r in group):.0f} s | "
            f"{max(max(r['peak_rss_mb'].values()) for r in group):,.0f} MB | {statistics.fmean(fit):.0f} s |"
        )
    for r in lean:
        plan = r["training_rows"]
        lines += ["", (f"## Seed {r['seed']}: what the lean run chose ({plan['sampling']['describe']}, "
                       f"{plan['train_groups']:,} groups, {plan['train_rows']:,} rows)"), "",
                  "Samplings on the pilot groups (validation NDCG@10; the leanest within z·se of the best wins):", "",
                  "| sampling | rows | validation NDCG@10 | gap to best (se) |", "|---|---|---|---|"]  # fmt: skip
        for c in plan["sampling_curve"]:
            lines.append(f"| {c['sampling']} | {c['rows']:,} | {c['ndcg']:.4f} | {c['gap_to_best']:+.4f} ({c['se']:.4f}) |")
        lines += ["", "Groups, doubled while the doubling gains more than z·se:", "",
                  "| (window, user) pairs | groups | rows | validation NDCG@10 | gain (se) |", "|---|---|---|---|---|"]
        for c in plan["groups_curve"]:
            gain = f"{c['gain']:+.4f} ({c['se']:.4f})" if "gain" in c else "pilot"
            lines.append(f"| {c['pairs']:,} | {c['groups']:,} | {c['rows']:,} | {c['ndcg']:.4f} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rows", description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--tune-budget", type=float, default=0.0)
    p.add_argument("--modes", nargs="+", choices=("lean", "full"), default=["full", "lean"])
    p.add_argument("--data", type=Path, default=None, help="an existing `python -m training generate` folder")
    p.add_argument("--smoke", action="store_true", help="30,000 interactions, one seed")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    n = 30_000 if args.smoke else args.interactions
    seeds = args.seeds[:1] if args.smoke else args.seeds
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="recsys-rows-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp)
            write_synthetic(data, max(200, int(n * USERS_PER_INTERACTION)), max(300, int(n * ITEMS_PER_INTERACTION)),
                            n, max(2, n // 500_000))  # fmt: skip
        for seed in seeds:
            for mode in args.modes:
                r = run(data, seed, mode == "lean", args.tune_budget)
                rows.append(r)
                print(f"seed {seed} {mode:>4}: NDCG@10 {r['ndcg']:.4f}, {r['seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "rows_smoke" if args.smoke else "rows"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    text = report(rows, n)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
