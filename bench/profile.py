"""Where a loaded worker spends its time: py-spy flame graphs of the API worker and the
ranking worker while /recommend runs at 64 concurrent clients.

    python -m bench.profile [--duration 20] [--out bench/profiles]

Trains a model (MovieLens if present, else synthetic) into a temporary store, serves it on
127.0.0.1, drives load from a process of its own (bench.loadgen) and records one SVG per
worker with `py-spy record` (needs ptrace rights: root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.perf import train_model
from bench.servers import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[1]
PY_SPY = str(Path(sys.executable).parent / "py-spy")


def one_worker_each(server: ServerProcess) -> dict[str, int]:
    """A worker pid per service (the first of each)."""
    found: dict[str, int] = {}
    for name, proc in server.workers():
        found.setdefault(name, proc.pid)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "profiles")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recsys-profile-") as tmp:
        home = Path(tmp)
        os.environ["BENTOML_HOME"] = str(home)  # before this process first opens the store
        tag = train_model(home)
        server = start_server(["service:ApiService"], cwd=ROOT, env={"BENTOML_HOME": str(home), "RECSYS_MODEL_TAG": tag})
        try:
            bodies = home / "bodies.jsonl"
            from models.lifecycle.store import open_version

            users = open_version(tag).load_tables().user_ids[:500].tolist()
            bodies.write_text("".join(json.dumps({"user_id": u, "k": 10}) + "\n" for u in users))
            load = subprocess.Popen([sys.executable, "-m", "bench.loadgen", f"{server.url}/recommend", str(bodies),
                                     "--concurrency", str(args.concurrency), "--duration", str(args.duration + 6),
                                     "--warmup", "3"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
            recorders = [
                subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(args.duration)),
                                  "--rate", "200", "--format", "flamegraph", "--nonblocking",
                                  "--output", str(args.out / f"{name}.svg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                for name, pid in one_worker_each(server).items()
            ]
            for r in recorders:
                r.wait(timeout=args.duration + 60)
            out, _ = load.communicate(timeout=args.duration + 60)
            summary = json.loads(out.strip().splitlines()[-1])
            ok = summary["statuses"].get("200", 0)
            print(f"load: {ok / summary['duration_s']:.0f} req/s at {args.concurrency} clients, "
                  f"statuses {summary['statuses']}")  # fmt: skip
        finally:
            server.stop()
    for svg in sorted(args.out.glob("*.svg")):
        print(f"{svg}: {svg.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
