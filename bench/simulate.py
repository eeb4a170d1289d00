"""Replay a data set forward in time against a running service, as a live client.

The interactions after the temporal cutoff (training/split.py, window 0) are played in time
order: for each, the user asks `/recommend`; when the user's real next item is among the k
items, a click on it is sent with the response's recommendation_id; the real interaction is
sent as an event either way (a `rating` with its value, or a `view`), timestamped now. The
service must have been trained on the interactions before the cutoff only (`--write-base`
writes them; otherwise the tables know the replayed items and `exclude_seen` hides them).
Bounded in rate and time; 127.0.0.1 only. Prints and plots (PNG) the hit rate over time per
variant and the online counters the service reports on /metrics.

    python -m bench.simulate --write-base /tmp/base --dataset movielens --data ../shared/data/movielens-small
    python -m training --dataset interactions --data /tmp/base/interactions.parquet --items /tmp/base/items.csv \\
        --user-col user_id --item-col item_id --time-col ts --rating-col rating
    python -m bench.simulate --url http://127.0.0.1:3000 --dataset movielens --data ../shared/data/movielens-small
    python -m bench.simulate --smoke      # trains, serves and replays a tiny synthetic set (seconds)
    python -m bench.simulate --ab --dataset movielens --data ../shared/data/movielens-small   # the A/B bar
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from bench.loadgen import check_loopback
from training.datasets import Dataset, movielens, synthetic
from training.split import SplitConfig, cutoff_time

RESULTS = Path(__file__).parent / "results"


def replay_split(dataset: Dataset, config: SplitConfig | None = None) -> tuple[Dataset, pd.DataFrame]:
    """The data set before the test cutoff (to train on) and the interactions from it on, in
    time order: user_id, item_id, ts, rating (NaN: none)."""
    config = config or SplitConfig()
    log = dataset.log
    cutoff = cutoff_time(log, 0, config)
    before = log.ts < cutoff
    base = Dataset(f"{dataset.name}-before-{cutoff}", log.subset(before), dataset.catalog,
                   f"{dataset.content_hash}-before-{cutoff}", {**dataset.source, "before": cutoff})  # fmt: skip
    after = log.subset(~before)
    replay = pd.DataFrame({"user_id": log.user_ids[after.user], "item_id": dataset.catalog.item_ids[after.item],
                           "ts": after.ts, "rating": after.rating})  # fmt: skip
    return base, replay.sort_values(["ts", "user_id"], kind="stable").reset_index(drop=True)


def write_base(base: Dataset, folder: Path) -> tuple[Path, Path]:
    """The base as files `python -m training --dataset interactions` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    log, cat = base.log, base.catalog
    frame = pd.DataFrame({"user_id": log.user_ids[log.user], "item_id": cat.item_ids[log.item], "ts": log.ts,
                          "rating": log.rating})  # fmt: skip
    interactions, items = folder / "interactions.parquet", folder / "items.csv"
    frame.to_parquet(interactions, index=False)
    pd.DataFrame({"item_id": cat.item_ids, "title": cat.titles, "genres": cat.genres, "year": cat.years}).to_csv(items, index=False)
    return interactions, items


@dataclass
class Step:
    t: float  # seconds since the start
    variant: str
    model_tag: str
    hit: bool


@dataclass
class SimResult:
    steps: list[Step] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)  # by endpoint and status
    requests: int = 0
    duration_s: float = 0.0

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([s.__dict__ for s in self.steps], columns=["t", "variant", "model_tag", "hit"])

    def summary(self) -> pd.DataFrame:
        f = self.frame()
        g = f.groupby(["variant", "model_tag"])["hit"]
        return pd.DataFrame({"steps": g.size(), "hits": g.sum(), "hit_rate": g.mean()}).reset_index()

    def over_time(self, n_buckets: int = 10) -> pd.DataFrame:
        """Hit rate per variant in `n_buckets` equal spans of the run."""
        f = self.frame()
        if f.empty:
            return pd.DataFrame()
        span = max(self.duration_s, 1e-9)
        f["bucket"] = np.minimum((f["t"] / span * n_buckets).astype(int), n_buckets - 1)
        table = f.pivot_table(index="bucket", columns="variant", values="hit", aggfunc="mean")
        table.index = (table.index + 1) * span / n_buckets
        table.index.name = "t_s"
        return table


def simulate(url: str, replay: pd.DataFrame, *, rate: float, duration_s: float, k: int = 10,
             max_steps: int | None = None, api_key: str | None = None, run_id: str | None = None) -> SimResult:  # fmt: skip
    """Play `replay` against the service at `url` (loopback only), at most `rate` steps per
    second for at most `duration_s` seconds (and `max_steps`)."""
    check_loopback(url)
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate {rate}, duration_s {duration_s}: both must be above 0")
    run_id = run_id or uuid.uuid4().hex[:12]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    result = SimResult()
    start = time.monotonic()
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for n, row in enumerate(replay.itertuples(index=False)):
            elapsed = time.monotonic() - start
            if elapsed >= duration_s or (max_steps is not None and n >= max_steps):
                break
            if n / rate > elapsed:  # paced: step n starts no earlier than n / rate
                time.sleep(min(n / rate - elapsed, duration_s - elapsed))
            result.requests += 1
            resp = client.post("/recommend", json={"user_id": str(row.user_id), "k": k})
            if resp.status_code != 200:
                result.failed[f"recommend {resp.status_code}"] += 1
                continue
            body = resp.json()
            items = [i["item_id"] for i in body["items"]]
            hit = str(row.item_id) in items
            result.steps.append(Step(time.monotonic() - start, body["variant"], body["model_tag"], hit))
            now = time.time()
            real: dict[str, Any] = {"event_id": f"{run_id}-{n}", "user_id": str(row.user_id),
                                    "item_id": str(row.item_id), "timestamp": now}  # fmt: skip
            if isinstance(row.rating, float) and math.isfinite(row.rating):
                real.update(type="rating", value=float(row.rating))
            else:
                real["type"] = "view"
            events = [real]
            if hit:
                events.insert(0, {**real, "event_id": f"{run_id}-{n}-click", "type": "click", "value": None,
                                  "recommendation_id": body["recommendation_id"]})  # fmt: skip
            result.requests += 1
            resp = client.post("/events", json={"events": events})
            if resp.status_code != 200:
                result.failed[f"events {resp.status_code}"] += 1
    result.duration_s = time.monotonic() - start
    return result


_SAMPLE = re.compile(r'^(recsys_impressions_total|recsys_outcome_events_total)\{([^}]*)\} ([0-9.e+-]+)$', re.MULTILINE)


def online_counters(url: str) -> pd.DataFrame:
    """Impressions and clicks per model version and variant, as the service's /metrics says."""
    check_loopback(url)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    rows = []
    for name, labels, value in _SAMPLE.findall(text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "recsys_outcome_events_total" and lab.get("type") != "click":
            continue
        rows.append({"model_version": lab.get("model_version"), "variant": lab.get("variant"),
                     "what": "impressions" if name == "recsys_impressions_total" else "clicks", "n": float(value)})  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=["model_version", "variant", "impressions", "clicks", "clicks_per_impression"])
    table = pd.DataFrame(rows).pivot_table(index=["model_version", "variant"], columns="what", values="n", aggfunc="sum",
                                           fill_value=0).reset_index()  # fmt: skip
    for col in ("impressions", "clicks"):
        if col not in table:
            table[col] = 0.0
    table["clicks_per_impression"] = table["clicks"] / table["impressions"].where(table["impressions"] > 0)
    return table


def settled_counters(url: str, timeout_s: float = 10.0) -> pd.DataFrame:
    """`online_counters` once two reads half a second apart agree: the service counts clicks
    off the request path, so the last ones land just after their responses."""
    deadline = time.monotonic() + timeout_s
    last = online_counters(url)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = online_counters(url)
        if now.equals(last):
            break
        last = now
    return last


def _save_hit_plot(fig: Any, ax: Any, png: Path, title: str, legend_size: int) -> None:
    """The hit-rate plots' axes, title and legend; written to `png` and closed."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("hit rate@k")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot(result: SimResult, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    f = result.frame()
    for variant, part in f.groupby("variant"):
        part = part.reset_index(drop=True)
        window = max(20, len(part) // 20)
        ax.plot(part["t"], part["hit"].astype(float).rolling(window, min_periods=1).mean(),
                label=f"{variant} (rolling {window} steps)")  # fmt: skip
    _save_hit_plot(fig, ax, png, title, legend_size=8)


def _dataset(args: argparse.Namespace) -> Dataset:
    if args.dataset == "movielens":
        if not args.data:
            raise SystemExit("error: --dataset movielens needs --data DIR (the folder with ratings.csv)")
        return movielens(args.data)
    return synthetic(args.n_users, args.n_items, args.n_interactions, seed=args.seed)


def _self_served(args: argparse.Namespace, dataset: Dataset, ab: bool) -> int:
    """Train on the data before the cutoff (and, with `ab`, a challenger with shuffled labels:
    a deliberately bad model), serve on 127.0.0.1 (split mode, half the users each), replay
    what came after, export the event log and (with `ab`) print the A/B report over it."""
    from bench.servers import start_server

    work = Path(tempfile.mkdtemp(prefix="recsys-simulate-"))
    home = work / "home"
    os.environ["BENTOML_HOME"] = str(home)
    from training.pipeline import TrainConfig, train

    base, replay = replay_split(dataset)
    budget = 0 if args.smoke else args.tune_budget
    tag = train(base, TrainConfig(tune_budget_s=budget), model_name="recsys-simulate").tag
    env = {"BENTOML_HOME": str(home), "RECSYS_MODEL_TAG": str(tag), "RECSYS_ONLINE_PATH": str(work / "state.sqlite3"),
           "RECSYS_MONITOR_SAMPLE": "0"}  # fmt: skip
    challenger = None
    if ab:
        challenger = train(base, TrainConfig(tune_budget_s=budget, shuffle_labels=True), model_name="recsys-simulate").tag
        env.update(RECSYS_CHALLENGER_TAG=str(challenger), RECSYS_CHALLENGER_MODE="split", RECSYS_CHALLENGER_SHARE="0.5")
    print(f"base: {len(base.log)} interactions before the cutoff; {len(replay)} to replay; champion {tag}"
          + (f", challenger (shuffled labels) {challenger}" if challenger else ""), flush=True)  # fmt: skip
    server = start_server(["service:ApiService"], cwd=Path(__file__).parent.parent, env=env)
    try:
        result = simulate(server.url, replay, rate=args.rate, duration_s=args.duration_s, k=args.k,
                          max_steps=args.max_steps)  # fmt: skip
        counters = settled_counters(server.url)
    finally:
        server.stop()
    code = _report(result, counters, args, f"{dataset.name}: champion {tag}" + (" vs shuffled labels" if ab else ""))
    if ab:
        from models.serving.event_log import EventLogExporter
        from models.serving.online import make_state
        from models.serving.settings import RecsysSettings
        from training.ab_report import add_arguments, run

        settings = RecsysSettings(online_path=work / "state.sqlite3")
        state = make_state(settings)
        assert state is not None
        try:
            EventLogExporter(state, str(work / "event_log"), batch_size=settings.event_export_batch).export()
        finally:
            state.close()
        parser = argparse.ArgumentParser()
        add_arguments(parser, settings)
        ab_args = parser.parse_args(["--events", str(work / "event_log"), "--min-effect", str(args.min_effect)])
        ab_args.json = False
        print()
        run(ab_args)
    return code


@dataclass
class LoopRun:
    """What `--loop` measured: the replay, the loop's decisions (from the registry's record)
    and the promotions, in seconds since the replay started."""

    result: SimResult
    first_champion: str
    decisions: list[dict[str, Any]]
    promotions: list[tuple[float, str]]  # (t, tag) of the loop's champions
    # The same next interactions (after the run) replayed against each version, each from a
    # copy of the online state at the end of the run: hit rate by tag. Live hit rates mix the
    # version with the period it served in; this compares the versions on the same steps.
    same_steps: dict[str, float] = field(default_factory=dict)
    same_steps_n: int = 0

    def hit_rates(self) -> pd.DataFrame:
        """Hit rate per served version (each version's own steps), in the order they served."""
        f = self.result.frame()
        g = f.groupby("model_tag", sort=False)
        table = pd.DataFrame({"first_t": g["t"].min(), "steps": g.size(), "hit_rate": g["hit"].mean()})
        return table.sort_values("first_t").reset_index()

    def bar(self) -> dict[str, Any]:
        """The issue's bar: the loop retrained at least once on the simulated events, a version
        it promoted replays a hit rate at least the first champion's, 0 failed requests."""
        rates = self.same_steps or self.hit_rates().set_index("model_tag")["hit_rate"].to_dict()
        first = float(rates.get(self.first_champion, math.nan))
        promoted = {tag: float(rates[tag]) for _, tag in self.promotions if tag in rates}
        retrains = sum(1 for d in self.decisions if d.get("decision") == "retrain")
        best = max(promoted.values(), default=math.nan)
        return {"retrains": retrains, "hit_rates_on": f"the same {self.same_steps_n} next steps" if self.same_steps
                else "the steps each version served", "first_champion_hit_rate": first, "promoted_hit_rates": promoted,
                "failed": sum(self.result.failed.values()),
                "passed": retrains >= 1 and bool(promoted) and best >= first and not self.result.failed}  # fmt: skip


def plot_loop(run: LoopRun, png: Path, title: str) -> None:
    """Rolling hit rate over time per served version, the loop's promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    f = run.result.frame()
    window = max(20, len(f) // 25)
    ax.plot(f["t"], f["hit"].astype(float).rolling(window, min_periods=1).mean(), color="0.6", lw=1,
            label=f"all steps (rolling {window})")  # fmt: skip
    for tag, part in f.groupby("model_tag", sort=False):
        short = str(tag).split(":")[-1][:8]
        ax.plot(part["t"], part["hit"].astype(float).expanding().mean(), lw=2, label=f"{short} (cumulative)")
    for n, (t, tag) in enumerate(run.promotions):
        ax.axvline(t, color="red", ls="--", lw=1, label="loop promotes" if n == 0 else None)
    _save_hit_plot(fig, ax, png, title, legend_size=7)


def loop_summary(run: LoopRun, dataset_name: str, args: argparse.Namespace, min_new: int) -> str:
    """The md summary of a `--loop` run."""
    r, bar = run.result, run.bar()
    head = (f"`python -m bench.simulate {' '.join(sys.argv[1:]) or '--loop'}`: rate {args.rate:g}/s, "
             f"{r.duration_s:.0f} s, 127.0.0.1; the loop: `python -m training loop --interval {args.export_interval:g} "
             f"--min-new-events {min_new} --promote-on offline` on the base data plus the event log "
             f"(exported by the service every {args.export_interval:g} s).")
    result = (f"{len(r.steps)} replayed steps, {r.requests} requests, **{bar['failed']} failed**. "
             f"Bar {'passed' if bar['passed'] else 'NOT passed'}: {bar['retrains']} retrain(s), first champion's "
             f"hit rate {bar['first_champion_hit_rate']:.4f} ({bar['hit_rates_on']}), promoted: "
              + (", ".join(f"`{t}` {v:.4f}" for t, v in bar["promoted_hit_rates"].items()) or "none") + ".")
    lines = [f"# The closed loop on {dataset_name}", "", head, "", result, "",
             "| served version | from (s) | steps | hit rate@k |", "|---|---|---|---|"]  # fmt: skip
    for row in run.hit_rates().itertuples(index=False):
        lines.append(f"| `{row.model_tag}` | {row.first_t:.1f} | {row.steps} | {row.hit_rate:.4f} |")
    if run.same_steps:
        lines += ["", (f"The same {run.same_steps_n} next interactions (after the run) replayed against each version "
                  "alone, each from a copy of the online state at the end of the run (what the bar compares: the "
                  "live figures above mix each version with the period it served in):"), "",
                  "| version | hit rate@k, same steps |", "|---|---|"]  # fmt: skip
        lines += [f"| `{t}`{' (first champion)' if t == run.first_champion else ''} | {v:.4f} |"
                  for t, v in run.same_steps.items()]  # fmt: skip
    lines += ["", "Decisions (the registry's record, action `loop`):", ""]
    for d in run.decisions:
        gate = d.get("gate") or {}
        lines.append(f"- {d['at']} **{d['decision']}** on {d.get('triggers')} ({d.get('new_events')} new events): "
                     f"`{d.get('tag')}` trained in {d.get('train_s')} s; gate: {gate.get('reason')}; "
                     f"staged: {d.get('staged')}")  # fmt: skip
    lines += ["", "Plot: `loop.png` (hit rate over time, cumulative per served version; the promotions in red).", ""]
    return "\n".join(lines)


def same_steps_hit_rates(tags: list[str], replay: pd.DataFrame, state: Path, env: dict[str, str], work: Path,
                         k: int) -> dict[str, float]:  # fmt: skip
    """Each version served alone (pinned, no reload, no export) from its own copy of `state`,
    replaying the same `replay` rows: its hit rate."""
    import shutil

    from bench.servers import start_server

    out = {}
    for n, tag in enumerate(tags):
        copy = work / f"same-steps-{n}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{state}{suffix}").exists():
                shutil.copy(f"{state}{suffix}", f"{copy}{suffix}")
        server = start_server(["service:ApiService"], cwd=Path(__file__).parent.parent, env={
            **env, "RECSYS_MODEL_TAG": tag, "RECSYS_ONLINE_PATH": str(copy), "RECSYS_RELOAD_INTERVAL_S": "0",
            "RECSYS_EVENT_LOG_INTERVAL_S": "0"})  # fmt: skip
        try:
            result = simulate(server.url, replay, rate=1000, duration_s=600, k=k)
        finally:
            server.stop()
        if result.failed:
            raise RuntimeError(f"{tag}: failed requests in the same-steps replay: {dict(result.failed)}")
        out[tag] = float(result.frame()["hit"].mean())
    return out


def _self_served_loop(args: argparse.Namespace, dataset: Dataset) -> int:
    """The closed loop shown: a first champion trained on the data before the cutoff, served
    on 127.0.0.1 following the registry (live reload) with the event log exported every few
    seconds; `python -m training loop` runs beside it on the base data plus that log
    (promoting on the offline gate) while the replay plays; the plot marks its promotions."""
    from bench.servers import start_process, start_server

    work = Path(tempfile.mkdtemp(prefix="recsys-simulate-loop-"))
    home = work / "home"
    os.environ["BENTOML_HOME"] = str(home)
    from models.lifecycle import registry
    from training.pipeline import TrainConfig, train

    name = "recsys-simulate"
    base, replay = replay_split(dataset)
    interactions, items = write_base(base, work / "base")
    budget = 0 if args.smoke else args.tune_budget
    first = train(base, TrainConfig(tune_budget_s=budget), model_name=name).tag
    assert first is not None
    registry.promote(first, "champion", reason="first version")
    planned = min(len(replay), int(args.rate * args.duration_s), args.max_steps or len(replay))
    # The first retrain after a third of the planned replay: enough events to matter, and
    # time left to serve what it promotes. Each step sends 1 or 2 events.
    min_new = args.loop_min_new_events or max(1, planned // 3)
    log_path = work / "event_log"
    env = {"BENTOML_HOME": str(home), "RECSYS_MODEL_NAME": name, "RECSYS_ONLINE_PATH": str(work / "state.sqlite3"),
           "RECSYS_MONITOR_SAMPLE": "0", "RECSYS_EVENT_LOG_PATH": str(log_path),
           "RECSYS_EVENT_LOG_INTERVAL_S": str(args.export_interval)}  # fmt: skip
    print(f"base: {len(base.log)} interactions before the cutoff; {len(replay)} to replay ({planned} planned); "
          f"first champion {first}; the loop retrains after {min_new} new events", flush=True)  # fmt: skip
    server = start_server(["service:ApiService"], cwd=Path(__file__).parent.parent, env=env)
    loop_cmd = [sys.executable, "-m", "training", "loop", "--interval", str(args.export_interval),
                "--min-new-events", str(min_new), "--drift-url", "off", "--max-age", "off", "--promote-on", "offline",
                "--dataset", "interactions", "--data", str(interactions), "--items", str(items), "--user-col",
                "user_id", "--item-col", "item_id", "--time-col", "ts", "--rating-col", "rating",
                "--events", str(log_path), "--model-name", name, "--tune-budget", str(budget), "--json"]  # fmt: skip
    loop_proc = start_process(loop_cmd, Path(__file__).parent.parent, env, 0, work / "loop.log", wait=False)
    try:
        start_wall = time.time()
        result = simulate(server.url, replay, rate=args.rate, duration_s=args.duration_s, k=args.k,
                          max_steps=args.max_steps)  # fmt: skip
        counters = settled_counters(server.url)
    finally:
        loop_proc.stop()
        server.stop()
    events = registry.load(name).events
    decisions = [e for e in events if e.get("action") == "loop"]
    promotions = [(pd.Timestamp(e["at"]).timestamp() - start_wall, str(e["tag"])) for e in events
                  if e.get("action") == "promote" and e.get("stage") == "champion" and e.get("reason") == "loop"]  # fmt: skip
    run = LoopRun(result, first, decisions, promotions)
    done = len(result.steps) + sum(n for key, n in result.failed.items() if key.startswith("recommend"))
    rest = replay.iloc[done:done + args.eval_steps]
    if len(rest) and promotions:
        run.same_steps = same_steps_hit_rates([first, *dict.fromkeys(t for _, t in promotions)], rest,
                                              work / "state.sqlite3", env, work, args.k)  # fmt: skip
        run.same_steps_n = len(rest)
        print(f"hit rate on the same {len(rest)} next steps: {json.dumps(run.same_steps)}")
    code = _report(result, counters, args, f"{dataset.name}: the closed loop", plot_png=False)
    rates, bar = run.hit_rates(), run.bar()
    print("hit rate per served version:")
    print(rates.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("loop decisions:")
    for d in decisions:
        gate = d.get("gate") or {}
        print(f"  {d['at']} {d['decision']} triggers={d.get('triggers')} new_events={d.get('new_events')} "
              f"tag={d.get('tag')} staged={d.get('staged')} gate: {gate.get('reason')} "
              f"(ndcg {gate.get('challenger_ndcg')} vs champion {gate.get('champion_ndcg')}) train {d.get('train_s')} s")  # fmt: skip
    print(f"bar: {json.dumps(bar)}")
    png = args.out / "loop.png"
    plot_loop(run, png, f"{dataset.name}: the closed loop (first champion {first.split(':')[-1][:8]})")
    (args.out / "loop.json").write_text(json.dumps({
        "dataset": dataset.name, "rate": args.rate, "duration_s": result.duration_s, "min_new_events": min_new,
        "steps": len(result.steps), "requests": result.requests, "failed": dict(result.failed),
        "hit_rates": json.loads(rates.to_json(orient="records")), "decisions": decisions,
        "promotions": promotions, "bar": bar,
    }, indent=1, default=str))  # fmt: skip
    (args.out / "loop.md").write_text(loop_summary(run, dataset.name, args, min_new))
    print(f"plot: {png}; summary: {args.out / 'loop.md'}; loop log: {work / 'loop.log'}")
    if loop_proc.proc.returncode not in (0, -15, None):
        print(f"the loop exited {loop_proc.proc.returncode}:\n{loop_proc.log()[-3000:]}", file=sys.stderr)
    return code if bar["passed"] else 1


def _report(result: SimResult, counters: pd.DataFrame, args: argparse.Namespace, title: str,
            plot_png: bool = True) -> int:
    summary = result.summary()
    print(f"{len(result.steps)} steps in {result.duration_s:.1f} s, {result.requests} requests, "
          f"{sum(result.failed.values())} failed {dict(result.failed) or ''}")  # fmt: skip
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("hit rate over time (per variant):")
    print(result.over_time().to_string(float_format=lambda v: f"{v:.4f}"))
    print("online counters on /metrics:")
    print(counters.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "simulate.png"
    if plot_png:
        plot(result, png, title)
    (args.out / "simulate.json").write_text(json.dumps({
        "steps": len(result.steps), "requests": result.requests, "failed": dict(result.failed),
        "duration_s": result.duration_s, "summary": json.loads(summary.to_json(orient="records")),
        "online_counters": json.loads(counters.to_json(orient="records")),
    }, indent=1))  # fmt: skip
    if plot_png:
        print(f"plot: {png}")
    return 0 if not result.failed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the running service (loopback only)")
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    p.add_argument("--data", default=None, help="movielens: the folder with ratings.csv")
    p.add_argument("--n-users", type=int, default=3000)
    p.add_argument("--n-items", type=int, default=2000)
    p.add_argument("--n-interactions", type=int, default=150_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=20.0, help="replayed interactions per second, at most")
    p.add_argument("--duration-s", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many interactions")
    p.add_argument("--k", type=int, default=10, help="items per /recommend")
    p.add_argument("--api-key", default=os.environ.get("RECSYS_SIMULATE_API_KEY"), help="Bearer key, if the API needs one")
    p.add_argument("--write-base", type=Path, default=None, metavar="DIR",
                   help="write the interactions before the cutoff (to train on) to DIR and exit")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="where simulate.png and simulate.json go")
    p.add_argument("--smoke", action="store_true", help="train, serve and replay a tiny synthetic set (seconds)")
    p.add_argument("--ab", action="store_true", help="train a champion and a --shuffle-labels challenger on the "
                   "base, serve them in split mode on 127.0.0.1, replay, and print the A/B report")  # fmt: skip
    p.add_argument("--loop", action="store_true", help="serve a first champion following the registry, run "
                   "`python -m training loop` beside it on the base data plus the event log, replay; "
                   "loop.png (promotions marked), loop.json")  # fmt: skip
    p.add_argument("--loop-min-new-events", type=int, default=None,
                   help="--loop: the loop's event trigger (default: a third of the planned steps)")  # fmt: skip
    p.add_argument("--eval-steps", type=int, default=500,
                   help="--loop: the next interactions after the run replayed against each version alike")  # fmt: skip
    p.add_argument("--export-interval", type=float, default=5.0,
                   help="--loop: seconds between the service's exports and the loop's looks")  # fmt: skip
    p.add_argument("--tune-budget", type=float, default=10.0, help="--ab, --loop: seconds of ranker tuning per model")
    p.add_argument("--min-effect", type=float, default=None, help="--ab: the A/B report's relative effect "
                   "(default: RECSYS_AB_MIN_EFFECT)")  # fmt: skip
    args = p.parse_args(argv)
    if args.min_effect is None:
        from models.serving.settings import RecsysSettings

        args.min_effect = RecsysSettings().ab_min_effect
    if args.loop:
        return _self_served_loop(args, synthetic(300, 200, 12_000, n_topics=10, seed=5) if args.smoke else _dataset(args))
    if args.smoke:
        args.duration_s = min(args.duration_s, 8.0)
        return _self_served(args, synthetic(300, 200, 12_000, n_topics=10, seed=5), ab=False)
    if args.ab:
        return _self_served(args, _dataset(args), ab=True)
    base, replay = replay_split(_dataset(args))
    if args.write_base is not None:
        interactions, items = write_base(base, args.write_base)
        print(f"{len(base.log)} interactions before the cutoff: {interactions}, {items}; {len(replay)} to replay. Train:\n"
              f"python -m training --dataset interactions --data {interactions} --items {items} --user-col user_id "
              "--item-col item_id --time-col ts --rating-col rating")  # fmt: skip
        return 0
    check_loopback(args.url)
    result = simulate(args.url, replay, rate=args.rate, duration_s=args.duration_s, k=args.k,
                      max_steps=args.max_steps, api_key=args.api_key)  # fmt: skip
    return _report(result, settled_counters(args.url), args, f"{args.dataset}: replay after the cutoff")


if __name__ == "__main__":
    sys.exit(main())
