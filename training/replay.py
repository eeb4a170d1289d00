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
from collections.abc import Sequence
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

DESCRIPTION = ("Replay the requests the service logged as answered by the champion against a "
               "challenger, in this process, before promoting it: overlap@10, rank correlation and "
               "latency per endpoint.")  # fmt: skip


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


REPLAYABLE = ("recommend", "rank")
# Why a logged request gives no rank correlation: reason -> what it means (the --json key is the reason).
NOT_COMPARABLE = {
    "served_items_unknown": "items the champion returned are unknown to the challenger's catalog",
    "requested_items_unknown": "requested items are unknown to the challenger's catalog",
    "endpoint_not_replayable": f"endpoint not replayable, valid: {', '.join(REPLAYABLE)}",
}
EXAMPLES = 3  # unknown ids kept per reason for the text report


@dataclass
class EndpointStats:
    overlap: list[float] = field(default_factory=list)
    correlation: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    logged: int = 0
    not_comparable: dict[str, int] = field(default_factory=dict)  # reason (NOT_COMPARABLE) -> requests
    examples: dict[str, list[str]] = field(default_factory=dict)
    cold_users: int = 0  # users the challenger does not know: it answered with popular items

    def refuse(self, reason: str, ids: Sequence[str] = ()) -> None:
        self.not_comparable[reason] = self.not_comparable.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        seen.extend(i for i in dict.fromkeys(ids) if i not in seen)
        del seen[EXAMPLES:]

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.seconds) * 1000
        pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
        return {
            "requests": self.logged,
            "overlap_at_10": float(np.mean(self.overlap)) if self.overlap else float("nan"),
            "rank_correlation": float(np.mean(self.correlation)) if self.correlation else float("nan"),
            "not_comparable": sum(self.not_comparable.values()),
            "not_comparable_reasons": dict(sorted(self.not_comparable.items())),
            "unknown_id_examples": {reason: ids for reason, ids in sorted(self.examples.items()) if ids},
            "challenger_cold_users": self.cold_users,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": float(ms.mean()) if len(ms) else float("nan")},
        }


def _replay_one(logged: LoggedRequest, challenger: LocalRanker, s: EndpointStats) -> None:
    req = logged.request
    if logged.endpoint not in REPLAYABLE:
        s.refuse("endpoint_not_replayable")
        return
    if challenger.recommender.user_index(req["user_id"]) is None:
        s.cold_users += 1
    start = time.perf_counter()
    try:
        if logged.endpoint == "recommend":
            got = challenger.recommend(req["user_id"], int(req["k"]), bool(req["exclude_seen"]))
        else:
            got = challenger.rank(req["user_id"], list(req["item_ids"]))
    except UnknownItemsError as err:  # a /rank request the challenger would refuse with a 400
        s.refuse("requested_items_unknown", err.unknown)
        return
    s.seconds.append(time.perf_counter() - start)
    s.overlap.append(overlap_at_k(logged.items, got, 10))
    try:
        s.correlation.append(rank_correlation(logged.items, challenger.scores(req["user_id"], logged.items)))
    except UnknownItemsError as err:
        s.refuse("served_items_unknown", err.unknown)


def replay(requests: list[LoggedRequest], challenger: LocalRanker) -> dict[str, dict[str, Any]]:
    stats: dict[str, EndpointStats] = {}
    for logged in requests:
        s = stats.setdefault(logged.endpoint, EndpointStats())
        s.logged += 1
        _replay_one(logged, challenger, s)
    return {endpoint: st.summary() for endpoint, st in sorted(stats.items())}


def not_comparable_line(summary: dict[str, Any]) -> str:
    """`not comparable: 46 of 46 (46: items ... catalog, e.g. i7, i9)` for one endpoint's summary."""
    reasons = []
    for reason, count in summary["not_comparable_reasons"].items():
        ids = summary["unknown_id_examples"].get(reason)
        reasons.append(f"{count}: {NOT_COMPARABLE[reason]}" + (f", e.g. {', '.join(ids)}" if ids else ""))
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return f"not comparable: {summary['not_comparable']} of {summary['requests']}{why}"


def build_parser(settings: RecsysSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training replay", description=DESCRIPTION)
    p.add_argument("--logs", type=Path, default=settings.monitor_dir, help="the monitor log folder")
    p.add_argument("--challenger", default="challenger", help="tag or stage (default: the challenger)")
    p.add_argument("--champion", default="champion", help="replay what this version answered (default: the champion)")
    p.add_argument("--limit", type=int, default=None, help="at most this many requests")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
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
    for endpoint, r in result["endpoints"].items():
        if r["not_comparable"]:
            print(f"{endpoint}: {not_comparable_line(r)}")
        if r["challenger_cold_users"]:
            print(f"{endpoint}: {r['challenger_cold_users']} of {r['requests']} requests are for users the "
                  "challenger does not know (it answered with popular items)")  # fmt: skip
    return 0
