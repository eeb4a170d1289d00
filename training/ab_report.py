"""`python -m training models ab-report`: the challenger against the champion on what users did
with what each showed, from the event log (models/serving/event_log.py).

The versions come from the impressions (variant champion / challenger of split mode) unless
given. Only the period in which the challenger served counts, for both: before it the
champion served everyone, and a comparison across periods would measure the period.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd

from models.core.outcomes import (
    CI_METHOD,
    METRICS,
    Comparison,
    attribute,
    compare,
    per_impression,
    per_variant,
)
from models.serving.event_log import read_event_log, read_impressions
from models.serving.settings import RecsysSettings

NOT_ENOUGH = "not enough data to decide"


class NoTrafficError(ValueError):
    """The event log holds no impressions to compare (or not of both versions)."""


def add_arguments(p: argparse.ArgumentParser, settings: RecsysSettings) -> None:
    p.add_argument("--events", default=settings.event_log_path, help="the event log (default: RECSYS_EVENT_LOG_PATH)")
    p.add_argument("--champion", default=None, help="champion tag (default: the impressions' champion variant)")
    p.add_argument("--challenger", default=None, help="challenger tag (default: the impressions' challenger variant)")
    p.add_argument("--k", type=int, default=settings.ab_k, help="CTR@k and MRR cut-off (default: RECSYS_AB_K)")
    p.add_argument("--window-s", type=float, default=settings.outcome_window_s,
                   help="attribution window, seconds (default: RECSYS_OUTCOME_WINDOW_S)")  # fmt: skip
    p.add_argument("--min-effect", type=float, default=settings.ab_min_effect,
                   help="relative change to detect (default: RECSYS_AB_MIN_EFFECT)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=settings.ab_alpha, help="significance level (default: RECSYS_AB_ALPHA)")
    p.add_argument("--power", type=float, default=settings.ab_power, help="power (default: RECSYS_AB_POWER)")
    p.add_argument("--primary", choices=METRICS, default=settings.ab_primary_metric,
                   help="the metric of the overall verdict (default: RECSYS_AB_PRIMARY_METRIC)")  # fmt: skip


@dataclass(frozen=True)
class AbReport:
    champion: str
    challenger: str
    since: float
    table: pd.DataFrame
    comparisons: list[Comparison]
    primary: str
    alpha: float
    min_effect: float
    k: int

    @property
    def verdict(self) -> str:
        return next(c.verdict for c in self.comparisons if c.metric == self.primary)

    def as_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion, "challenger": self.challenger, "since": self.since,
            "per_variant": json.loads(self.table.to_json(orient="records")),
            "comparisons": [_finite(c.as_dict()) for c in self.comparisons],
            "ci_method": CI_METHOD, "confidence": 1 - self.alpha, "min_effect": self.min_effect,
            "primary_metric": self.primary, "verdict": self.verdict, "k": self.k,
        }  # fmt: skip


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: None for 'cannot be computed yet'."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _version_of(impressions: pd.DataFrame, variant: str) -> str:
    served = impressions.loc[impressions["variant"] == variant, "model_version"]
    if served.empty:
        raise NoTrafficError(f"no impressions of variant {variant!r} in the event log (variants found: "
                             f"{sorted(impressions['variant'].unique())}); is RECSYS_CHALLENGER_MODE split?")  # fmt: skip
    return str(served.value_counts().index[0])


def build_report(events: pd.DataFrame, impressions: pd.DataFrame, *, champion: str | None = None,
                 challenger: str | None = None, k: int, window_s: float, min_effect: float, alpha: float,
                 power: float, primary: str = "ctr") -> AbReport:  # fmt: skip
    if impressions.empty:
        raise NoTrafficError("the event log holds no impressions (has the exporter run?)")
    champion = champion or _version_of(impressions, "champion")
    challenger = challenger or _version_of(impressions, "challenger")
    of_challenger = impressions.loc[impressions["model_version"] == challenger, "ts"]
    if of_challenger.empty:
        raise NoTrafficError(f"no impressions of the challenger {challenger} in the event log")
    since = float(of_challenger.min())
    window = impressions[(impressions["ts"] >= since) & impressions["model_version"].isin([champion, challenger])]
    attributed = attribute(events, window, window_s)
    rows = per_impression(window, attributed, k)
    comparisons = compare(rows, champion, challenger, min_effect=min_effect, alpha=alpha, power=power)
    return AbReport(champion, challenger, since, per_variant(window, attributed, k), comparisons, primary,
                    alpha, min_effect, k)  # fmt: skip


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def report_text(r: AbReport) -> str:
    cols = ["model_version", "variant", "users", "impressions", "clicks", "purchases", "ctr", "conversion", "mrr"]
    table = r.table[cols].rename(columns={"ctr": f"ctr@{r.k}", "mrr": f"mrr@{r.k}"})
    lines = [(f"A/B report: challenger {r.challenger} against champion {r.champion}, "
              f"impressions since {pd.Timestamp(r.since, unit='s', tz='UTC'):%Y-%m-%d %H:%M:%S} UTC"), "",
             table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), "",
             (f"difference = challenger - champion, {100 * (1 - r.alpha):.0f}% CI: {CI_METHOD}; minimum users "
              f"per arm to detect a {100 * r.min_effect:.0f}% relative change")]  # fmt: skip
    for c in r.comparisons:
        need = "n/a (no baseline yet)" if c.min_users is None else str(c.min_users)
        lines.append(f"  {c.metric:<10} {_num(c.champion)} -> {_num(c.challenger)}  diff {_num(c.difference, '+.4f')} "
                     f"[{_num(c.ci_low, '+.4f')}, {_num(c.ci_high, '+.4f')}]  p {_num(c.p_value, '.3g')}  users "
                     f"{c.users[0]}/{c.users[1]} (min {need}): {c.verdict}")  # fmt: skip
    lines.append(f"verdict ({r.primary}): {r.verdict}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report (exit 0), or why there is none (exit 1)."""
    events, impressions = read_event_log(args.events), read_impressions(args.events)
    try:
        report = build_report(events, impressions, champion=args.champion, challenger=args.challenger, k=args.k,
                              window_s=args.window_s, min_effect=args.min_effect, alpha=args.alpha,
                              power=args.power, primary=args.primary)  # fmt: skip
    except NoTrafficError as err:
        print(f"error: {args.events}: {err}; {NOT_ENOUGH}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict()) if args.json else report_text(report))
    return 0
