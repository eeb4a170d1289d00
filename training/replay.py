"""Replay logged requests against a challenger before promoting it:

    python -m training replay --logs monitoring --challenger challenger [--champion champion]

Reads the requests the service logged (`recsys_requests`, sampled by
RECSYS_REQUEST_LOG_SAMPLE) that the champion answered, has the challenger answer each one in
this process, and reports how far they agree: overlap@10 of the returned lists, and the rank
correlation (Spearman) of the challenger's scores over the champion's list, per endpoint,
with the challenger's latency per request (candidates, features and scoring, no HTTP).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.core.metrics import overlap_at_k, rank_correlation
from models.core.recommender import LocalRanker, Recommender, UnknownItemsError
from models.lifecycle.store import open_version
from models.serving.monitoring import logged_records
from models.serving.settings import RecsysSettings
from models.serving.variants import REQUEST_LOG
from training.lifecycle import resolve_ref


@dataclass(frozen=True)
class LoggedRequest:
    endpoint: str
    request: dict[str, Any]
    items: list[str]


def read_requests(logs: Path, model_tag: str, limit: int | None = None) -> list[LoggedRequest]:
    """The logged requests that `model_tag` answered, oldest file first."""
    out: list[LoggedRequest] = []
    for record in logged_records(logs, REQUEST_LOG, model_tag, hint=" and RECSYS_REQUEST_LOG_SAMPLE above 0"):
        out.append(LoggedRequest(record["endpoint"], record["request"], list(record["items"])))
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass
class EndpointStats:
    overlap: list[float] = field(default_factory=list)
    correlation: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    not_comparable: int = 0  # the champion returned items the challenger's catalog lacks

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.seconds) * 1000
        pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
        return {
            "requests": len(self.seconds),
            "overlap_at_10": float(np.mean(self.overlap)) if self.overlap else float("nan"),
            "rank_correlation": float(np.mean(self.correlation)) if self.correlation else float("nan"),
            "not_comparable": self.not_comparable,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": float(ms.mean()) if len(ms) else float("nan")},
        }


def replay(requests: list[LoggedRequest], challenger: LocalRanker) -> dict[str, dict[str, Any]]:
    stats: dict[str, EndpointStats] = {}
    for logged in requests:
        s = stats.setdefault(logged.endpoint, EndpointStats())
        req = logged.request
        start = time.perf_counter()
        if logged.endpoint == "recommend":
            got = challenger.recommend(req["user_id"], int(req["k"]), bool(req["exclude_seen"]))
        else:
            got = challenger.rank(req["user_id"], list(req["item_ids"]))
        s.seconds.append(time.perf_counter() - start)
        s.overlap.append(overlap_at_k(logged.items, got, 10))
        try:
            s.correlation.append(rank_correlation(logged.items, challenger.scores(req["user_id"], logged.items)))
        except UnknownItemsError:
            s.not_comparable += 1
    return {endpoint: st.summary() for endpoint, st in sorted(stats.items())}


def build_parser(settings: RecsysSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training replay", description=__doc__.splitlines()[0])
    p.add_argument("--logs", type=Path, default=settings.monitor_dir, help="the monitor log folder")
    p.add_argument("--challenger", default="challenger", help="tag or stage (default: the challenger)")
    p.add_argument("--champion", default="champion", help="replay what this version answered (default: the champion)")
    p.add_argument("--limit", type=int, default=None, help="at most this many requests")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    settings = RecsysSettings()
    args = build_parser(settings).parse_args(argv)
    champion = resolve_ref(args.champion, settings.model_name)
    version = open_version(resolve_ref(args.challenger, settings.model_name))
    requests = read_requests(args.logs, champion, args.limit)
    if not requests:
        raise FileNotFoundError(f"{args.logs}: no logged requests answered by {champion}")
    challenger = LocalRanker(Recommender.of(version), version.load_booster(settings.nthread))
    result = {"champion": champion, "challenger": version.tag, "endpoints": replay(requests, challenger)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"replayed {len(requests)} requests answered by {champion} against {version.tag}")
    print("| endpoint | requests | overlap@10 | rank corr. | p50 ms | p95 ms | not comparable |")
    print("|---|---|---|---|---|---|---|")
    for endpoint, r in result["endpoints"].items():
        lat = r["latency_ms"]
        print(f"| {endpoint} | {r['requests']} | {r['overlap_at_10']:.3f} | {r['rank_correlation']:.3f} | "
              f"{lat['p50']:.2f} | {lat['p95']:.2f} | {r['not_comparable']} |")  # fmt: skip
    return 0
