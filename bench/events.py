"""The online state's own throughput and latency, in-process (no HTTP), per backend: how much
of the /events bars (issue 15: 20,000 events/s in 100-event batches at 64 clients on SQLite,
1,000 req/s of 1-event requests) the store itself leaves to the rest of the request.

    python -m bench.events                  # ~6 minutes; writes bench/results/events.{md,json,png}
    python -m bench.events --smoke          # seconds; checks that the benchmark works

Writes: 2 processes (like 2 API workers) x 32 clients = 64 clients, each sending its next
batch when the last one was acknowledged, for a fixed time; batches of 100 and of 1, each
committed on its own ("direct") or through the group-commit writer, from threads ("group")
or from asyncio tasks awaiting `submit` ("group-async": 32 tasks per process). Backends:
SQLite with synchronous=FULL (the default) and NORMAL; Redis with appendfsync always (a real
redis-server started here). The clients' CPU includes building the events (what parsing a
request costs anyway); Redis' own CPU is added for Redis. Reads: `recent` of a random user
among 2,000 with 50 items each, paced at 200/s, measured idle and during each write cell.
Feast (its online store on SQLite and on Redis) is measured in a venv of its own
(bench/.venv-feast, created if missing) by bench/feast_probe.py, single-threaded, beside the
same single-threaded calls on this state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.servers import RedisServer, start_redis
from models.serving.events import Event
from models.serving.online.base import OnlineLimits, OnlineState
from models.serving.online.writer import GroupCommitWriter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FEAST_VENV = ROOT / "bench" / ".venv-feast"
FEAST_PACKAGES = ["feast==0.67.0", "redis==8.1.0"]
CORES = psutil.cpu_count() or 1
BARS = {100: 20_000.0, 1: 1_000.0}  # events/s the HTTP endpoint must reach, per batch size
MAX_EVENTS = 1000  # RecsysSettings.max_events' default: the largest joined commit
N_USERS, N_ITEMS = 10_000, 5_000
TYPES = ("view", "click", "add_to_cart", "purchase")


def open_state(spec: dict[str, Any]) -> OnlineState:
    # The settings' defaults, with a timeout long enough that a saturated store queues
    # rather than refuses (what is measured is its throughput).
    limits = OnlineLimits(max_items=200, retention_s=30 * 86400.0, journal_s=86400.0, timeout_s=10.0)
    if spec["backend"] == "sqlite":
        from models.serving.online.sqlite import SqliteState

        return SqliteState(Path(spec["path"]), limits, spec["synchronous"])
    from models.serving.online.redis import RedisState

    return RedisState(spec["url"], limits)


def make_batch(rng: np.random.Generator, tag: str, n: int, size: int) -> list[Event]:
    users, items = rng.integers(0, N_USERS, size), rng.integers(0, N_ITEMS, size)
    now = time.time()
    return [Event(f"{tag}-{n}-{j}", f"u{users[j]}", f"i{items[j]}", TYPES[j % 4], now) for j in range(size)]  # type: ignore[arg-type]


def _writer_process(spec: dict[str, Any], mode: str, batch: int, clients: int, start_at: float, stop_at: float,
                    out: Any) -> None:  # fmt: skip
    """One "API worker": `clients` threads (direct, group) or asyncio tasks (group-async,
    the way an async API would call `GroupCommitWriter.submit`) writing until `stop_at`."""
    state = open_state(spec)
    writer = GroupCommitWriter(state, MAX_EVENTS) if mode.startswith("group") else None
    results: list[tuple[int, list[float]]] = [(0, [])] * clients
    tags = [f"{os.getpid()}.{c}.{time.time_ns()}" for c in range(clients)]

    def client(c: int) -> None:
        assert mode in ("direct", "group")
        write = writer.write if writer is not None else state.write_events
        rng, n, lat = np.random.default_rng([os.getpid(), c]), 0, []
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            events = make_batch(rng, tags[c], n, batch)
            began = time.perf_counter()
            write(events)
            lat.append(time.perf_counter() - began)
            n += 1
        results[c] = (n, lat)

    async def async_client(c: int) -> None:
        assert writer is not None
        rng, n, lat = np.random.default_rng([os.getpid(), c]), 0, []
        while time.time() < stop_at:
            events = make_batch(rng, tags[c], n, batch)
            began = time.perf_counter()
            await writer.submit(events)
            lat.append(time.perf_counter() - began)
            n += 1
        results[c] = (n, lat)

    async def async_clients() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(async_client(c) for c in range(clients)))

    pool = [] if mode == "group-async" else [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in pool:
        th.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    if mode == "group-async":
        asyncio.run(async_clients())
    for th in pool:
        th.join()
    cpu = time.process_time() - cpu0
    commits = writer.commits if writer is not None else sum(n for n, _ in results)
    if writer is not None:
        writer.close()
    state.close()
    lat = [x for _, ls in results for x in ls]
    sample = lat if len(lat) <= 20_000 else list(np.random.default_rng(0).choice(lat, 20_000, replace=False))
    out.put({"requests": sum(n for n, _ in results), "cpu_s": cpu, "commits": commits, "latencies": sample})


def _paced_reads(state: OnlineState, stop: threading.Event, samples: list[float], rate: float = 200.0) -> None:
    rng = np.random.default_rng(1)
    while not stop.is_set():
        began = time.perf_counter()
        state.recent(f"r{rng.integers(0, 2000)}", 50)
        samples.append(time.perf_counter() - began)
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - began)))


@dataclass
class Cell:
    backend: str
    batch: int
    mode: str
    clients: int
    seconds: float
    requests: int
    commits: int
    cpu_s: float
    write_ms: dict[str, float]
    read_ms: dict[str, float]

    @property
    def events_per_s(self) -> float:
        return self.requests * self.batch / self.seconds

    def row(self) -> dict[str, Any]:
        bar = BARS[self.batch]
        cpu_per_event = self.cpu_s / max(1, self.requests * self.batch)
        return {
            "backend": self.backend, "batch": self.batch, "mode": self.mode, "clients": self.clients,
            "events_per_s": self.events_per_s, "req_per_s": self.requests / self.seconds,
            "commits_per_s": self.commits / self.seconds, "write_p50_ms": self.write_ms["p50"],
            "write_p99_ms": self.write_ms["p99"], "read_p50_ms": self.read_ms["p50"], "read_p99_ms": self.read_ms["p99"],
            "cpu_us_per_event": cpu_per_event * 1e6,
            # The store's CPU at the bar's rate, as a share of the machine: what it takes from
            # the budget that HTTP, parsing and the rest of the request also need.
            "cpu_share_at_bar": cpu_per_event * bar / CORES, "bar_events_per_s": bar,
        }  # fmt: skip


def pct(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": float("nan"), "p99": float("nan")}
    arr = np.asarray(samples) * 1000
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def populate_reads(state: OnlineState) -> None:
    rng = np.random.default_rng(2)
    for start in range(0, 2000, 10):
        state.write_events([Event(f"pop-{u}-{j}", f"r{u}", f"i{rng.integers(0, N_ITEMS)}", "view", 1e9 + j)
                            for u in range(start, start + 10) for j in range(50)])  # fmt: skip


def fresh_store(spec: dict[str, Any], redis: RedisServer) -> OnlineState:
    """An empty store of this spec (a new SQLite file; Redis flushed), with the read set."""
    if spec["backend"] == "sqlite":
        path = Path(spec["path"])
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()
    else:
        from redis import Redis

        with Redis.from_url(redis.url) as admin:
            admin.flushall()
    state = open_state(spec)
    populate_reads(state)
    return state


def idle_read_latency(state: OnlineState, seconds: float) -> dict[str, float]:
    idle, samples = threading.Event(), []
    timer = threading.Timer(seconds, idle.set)
    timer.start()
    _paced_reads(state, idle, samples, rate=1000.0)
    return pct(samples)


def run_cell(name: str, spec: dict[str, Any], reader: OnlineState, batch: int, mode: str, seconds: float,
             processes: int, threads: int, redis_pid: int | None) -> Cell:  # fmt: skip
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # the children import and open their state first
    stop_at = start_at + seconds
    procs = [ctx.Process(target=_writer_process, args=(spec, mode, batch, threads, start_at, stop_at, out))
             for _ in range(processes)]  # fmt: skip
    for p in procs:
        p.start()
    reads: list[float] = []
    stop = threading.Event()
    while time.time() < start_at:
        time.sleep(0.001)
    server_cpu0 = sum(psutil.Process(redis_pid).cpu_times()[:2]) if redis_pid else 0.0
    read_thread = threading.Thread(target=_paced_reads, args=(reader, stop, reads))
    read_thread.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    stop.set()
    read_thread.join()
    server_cpu = sum(psutil.Process(redis_pid).cpu_times()[:2]) - server_cpu0 if redis_pid else 0.0
    for p in procs:
        p.join(timeout=30)
    cell = Cell(name, batch, mode, processes * threads, seconds, sum(r["requests"] for r in results),
                sum(r["commits"] for r in results), sum(r["cpu_s"] for r in results) + server_cpu,
                pct([x for r in results for x in r["latencies"]]), pct(reads))  # fmt: skip
    r = cell.row()
    print(f"{name:14s} batch {batch:3d} {mode:11s}: {r['events_per_s']:9,.0f} events/s {r['req_per_s']:8,.0f} req/s "
          f"{r['commits_per_s']:6,.0f} commits/s  write p99 {r['write_p99_ms']:6.1f} ms  read p99 {r['read_p99_ms']:5.2f} ms  "
          f"CPU {r['cpu_us_per_event']:6.1f} us/event ({r['cpu_share_at_bar']:.0%} of {CORES} cores at the bar)", flush=True)  # fmt: skip
    return cell


def single_thread(state: OnlineState, seconds: float) -> dict[str, Any]:
    """The calls Feast is measured on, one at a time."""
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {}
    for batch in (100, 1):
        lat: list[float] = []
        deadline, n = time.perf_counter() + seconds, 0
        while time.perf_counter() < deadline:
            events = make_batch(rng, f"st{batch}-{time.time_ns()}", n, batch)
            began = time.perf_counter()
            state.write_events(events)
            lat.append(time.perf_counter() - began)
            n += 1
        out[f"write_{batch}"] = {**pct(lat), "rows_per_s": batch * len(lat) / sum(lat)}
    lat = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        state.recent(f"r{rng.integers(0, 2000)}", 50)
        lat.append(time.perf_counter() - began)
    out["read_1"] = pct(lat)
    return out


def ensure_feast(venv: Path) -> tuple[Path | None, str]:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import feast; print(feast.__version__)"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", *FEAST_PACKAGES], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"pip install {' '.join(FEAST_PACKAGES)} failed: {done.stderr.strip()[-1500:]}"
    return python, ""


def run_feast(python: Path, backend: str, work: Path, redis: RedisServer | None, seconds: float) -> dict[str, Any]:
    cmd = [str(python), str(ROOT / "bench" / "feast_probe.py"), "--backend", backend, "--dir", str(work / f"feast-{backend}"),
           "--seconds", str(seconds)]  # fmt: skip
    if redis is not None:
        cmd += ["--redis", f"127.0.0.1:{redis.port}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"feast probe ({backend}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("write_100", "write_1", "read_1"):  # the probe reports ms under *_ms keys
        result[key] = {"p50": result[key]["p50_ms"], "p99": result[key]["p99_ms"],
                       **({"rows_per_s": result[key]["rows_per_s"]} if "rows_per_s" in result[key] else {})}  # fmt: skip
    return result


def write_report(out: Path, cells: list[Cell], latency: dict[str, dict[str, Any]], feast_note: str,
                 machine: str, idle_reads: dict[str, dict[str, float]]) -> str:  # fmt: skip
    lines = [f"Machine: {machine}", "",
             "Writes at 64 clients (2 processes x 32 threads), in-process, no HTTP; reads paced at 200/s meanwhile.",
             ("CPU: the writers' processes (building the events included) plus redis-server's, per event; "
             "'share at bar' is that CPU at the bar's rate over the machine's cores."), "",
             ("| backend | batch | mode | events/s | req/s | commits/s | write p50 ms | write p99 ms | recent p50 ms "
             "| recent p99 ms | CPU us/event | share at bar |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        r = c.row()
        lines.append(f"| {c.backend} | {c.batch} | {c.mode} | {r['events_per_s']:,.0f} | {r['req_per_s']:,.0f} | "
                     f"{r['commits_per_s']:,.0f} | {r['write_p50_ms']:.1f} | {r['write_p99_ms']:.1f} | "
                     f"{r['read_p50_ms']:.2f} | {r['read_p99_ms']:.2f} | {r['cpu_us_per_event']:.1f} | "
                     f"{r['cpu_share_at_bar']:.0%} of {r['bar_events_per_s']:,.0f}/s |")  # fmt: skip
    lines += ["", "Reads with no writes (`recent`, 50 items): " + ", ".join(
        f"{k} p50 {v['p50']:.3f} ms, p99 {v['p99']:.3f} ms" for k, v in idle_reads.items()), ""]  # fmt: skip
    lines += [("One caller, one call at a time (the path Feast is measured on: 100 rows a write, 1 row a write, "
              "one user read):"), "",
              ("| system | write 100 p50 ms | write 100 p99 ms | rows/s (100) | write 1 p50 ms | write 1 p99 ms | "
              "read 1 p50 ms | read 1 p99 ms |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in latency.items():
        lines.append(f"| {name} | {r['write_100']['p50']:.2f} | {r['write_100']['p99']:.2f} | "
                     f"{r['write_100']['rows_per_s']:,.0f} | {r['write_1']['p50']:.2f} | {r['write_1']['p99']:.2f} | "
                     f"{r['read_1']['p50']:.3f} | {r['read_1']['p99']:.3f} |")  # fmt: skip
    if feast_note:
        lines += ["", f"Feast: {feast_note}"]
    text = "\n".join(lines)
    (out / "events.md").write_text(text + "\n")
    (out / "events.json").write_text(json.dumps({"machine": machine, "cells": [c.row() for c in cells],
                                                 "single_thread": latency, "idle_reads": idle_reads,
                                                 "feast_note": feast_note}, indent=2))  # fmt: skip
    plot(out / "events.png", cells)
    return text


def plot(path: Path, cells: list[Cell]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, batch in zip(axes, (100, 1), strict=True):
        chosen = [c for c in cells if c.batch == batch]
        labels = [f"{c.backend}, {c.mode}" for c in chosen]
        colors = {"direct": "C7", "group": "C0", "group-async": "C2"}
        ax.bar(range(len(chosen)), [c.events_per_s for c in chosen], color=[colors[c.mode] for c in chosen])
        ax.axhline(BARS[batch], color="C3", linestyle="--", label=f"HTTP bar {BARS[batch]:,.0f} events/s")
        ax.set_xticks(range(len(chosen)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("events/s (64 clients, in-process)")
        ax.set_title(f"batches of {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="per write cell")
    parser.add_argument("--smoke", action="store_true", help="short cells, SQLite FULL and Redis only, no Feast")
    parser.add_argument("--feast-venv", type=Path, default=FEAST_VENV, help="a venv with feast (created if missing)")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seconds = 0.5 if args.smoke else args.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {CORES} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
               f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    cells: list[Cell] = []
    latency: dict[str, dict[str, Any]] = {}
    idle_reads: dict[str, dict[str, float]] = {}
    feast_note = ""
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        work = Path(tmp)
        redis = start_redis(work / "redis")
        try:
            specs = {
                "sqlite FULL": {"backend": "sqlite", "path": str(work / "full.sqlite3"), "synchronous": "FULL"},
                "sqlite NORMAL": {"backend": "sqlite", "path": str(work / "normal.sqlite3"), "synchronous": "NORMAL"},
                "redis always": {"backend": "redis", "url": redis.url},
            }
            if args.smoke:
                del specs["sqlite NORMAL"]
            for name, spec in specs.items():
                pid = redis.proc.pid if spec["backend"] == "redis" and redis.proc else None
                for batch, mode in ((100, "direct"), (100, "group"), (100, "group-async"), (1, "direct"), (1, "group"),
                                    (1, "group-async")):
                    # Each cell on a fresh store holding the same read set: a store grows by
                    # ~100k events a cell, and a later cell on a larger one ran slower.
                    reader = fresh_store(spec, redis)
                    if not idle_reads.get(name):
                        idle_reads[name] = idle_read_latency(reader, min(2.0, seconds))
                    cells.append(run_cell(name, spec, reader, batch, mode, seconds, 2, 32, pid))
                    reader.close()
                if name != "sqlite NORMAL":
                    reader = fresh_store(spec, redis)
                    latency[f"this state, {name}"] = single_thread(reader, min(3.0, seconds))
                    reader.close()
            if not (args.smoke or args.no_feast):
                python, feast_note = ensure_feast(args.feast_venv)
                if python is not None:
                    latency["feast 0.67, sqlite online store"] = run_feast(python, "sqlite", work, None, 3.0)
                    latency["feast 0.67, redis online store"] = run_feast(python, "redis", work, redis, 3.0)
        finally:
            redis.stop()
    text = write_report(args.out, cells, latency, feast_note, machine, idle_reads)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
