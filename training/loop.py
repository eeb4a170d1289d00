"""`python -m training loop`: the closed loop. The service's own traffic (the event log) trains,
the offline gate and the online A/B report judge, and the registry's stages promote; the
service follows the stages by live reload.

One look (`--once`, e.g. a Kubernetes CronJob; or every `--interval` seconds):
1. a challenger the loop staged earlier is judged first: the A/B report over the event log
   (training/ab_report.py) says `challenger worse` -> the challenger is cleared; `not enough
   data to decide` (or no impressions yet) -> wait, up to the max wait, then clear; `no
   difference detected` or `challenger better` -> promote it to champion;
2. otherwise the triggers: enough new events since the last retrain, a drift alert on the
   service's /drift, a champion older than the max age. Any of them retrains on the base
   data plus the event log (`retrain --events`), gated offline forward in time against the
   champion (training/lifecycle.py decide); a version that passes becomes the champion
   (`offline`) or the challenger (`online`).

Every decision goes to the registry's record (action `loop`, with its figures) and to one log
line. The loop keeps no state of its own: the last retrain's event watermark, the champion's
promotion time and the challenger's start are read back from the registry's record, so a
restarted loop (or the next CronJob run) carries on where the last one stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from models.lifecycle import registry
from models.lifecycle.registry import RegistryError
from models.lifecycle.store import ModelCheckError
from models.serving.event_log import read_event_log, read_impressions
from models.serving.settings import RecsysSettings
from training.ab_report import NoTrafficError, build_report
from training.datasets import DataError
from training.lifecycle import decide

log = logging.getLogger("recsys.loop")
ACTION = "loop"  # the registry record's action of every loop decision
REASON = "loop"  # the promotion reason of the loop's versions (how it knows its own challenger)
NOT_ENOUGH = "not enough data to decide"
WORSE = "challenger worse"
PromoteOn = Literal["offline", "online"]
Verdict = Literal["promote", "clear", "wait"]


@dataclass(frozen=True)
class Triggers:
    """What the loop looks at; None turns a trigger off."""

    min_new_events: int | None
    drift_url: str | None
    max_age_s: float | None


@dataclass(frozen=True)
class Observed:
    """The figures the triggers are decided on."""

    new_events: int
    drift_status: str | None  # None: not asked or not reachable
    # Since the champion's promotion or the loop's last retrain, whichever is later (a retrain
    # the gate refused restarts the clock: the schedule is of retrains). None: no champion;
    # inf: neither is in the record any more.
    champion_age_s: float | None
    retrained: bool = False  # a retrain of the loop is on record
    drift_retried: bool = False  # the last retrain was drift's, and the champion has not changed since


def fired(t: Triggers, o: Observed) -> list[str]:
    """The triggers that fire, by name (empty: no retrain). 'insufficient_data' never fires.
    Drift and age need something new to learn from once the loop has retrained (the same
    data makes the same model), and a drift alert that one retrain did not fix (its version
    was refused, the champion is the same) waits for a new champion: it is a person's to look at."""
    out = []
    if t.min_new_events is not None and o.new_events >= t.min_new_events:
        out.append("new_events")
    nothing_new = o.retrained and o.new_events == 0
    if t.drift_url is not None and o.drift_status == "alert" and not nothing_new and not o.drift_retried:
        out.append("drift")
    if t.max_age_s is not None and o.champion_age_s is not None and o.champion_age_s > t.max_age_s and not nothing_new:
        out.append("max_age")
    return out


def judge(verdict: str | None, waited_s: float, max_wait_s: float) -> tuple[Verdict, str]:
    """What to do with a staged challenger given the A/B report's verdict (None: no report
    yet, e.g. no impressions of it): promote when it is not worse on a sufficient sample,
    clear when it is worse or waited too long, else wait."""
    if verdict == WORSE:
        return "clear", "the A/B report says the challenger is worse"
    if verdict in (None, NOT_ENOUGH):
        if waited_s > max_wait_s:
            return "clear", f"{NOT_ENOUGH} after {waited_s:.0f} s (max wait {max_wait_s:.0f} s)"
        return "wait", f"{NOT_ENOUGH} yet ({waited_s:.0f} of {max_wait_s:.0f} s)"
    return "promote", f"the A/B report says {verdict!r}: not worse, with the minimum sample"


def _seconds_since(at: str, now: float) -> float:
    return now - dt.datetime.fromisoformat(at).timestamp()


def last_retrain(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The loop's newest retrain record (newest last in the registry)."""
    return next((e for e in reversed(events) if e.get("action") == ACTION and e.get("decision") == "retrain"), None)


def promoted_at(events: list[dict[str, Any]], tag: str, stage: str) -> str | None:
    """When `tag` last got `stage` (the registry's `at`), or None if the record lost it."""
    return next((e["at"] for e in reversed(events) if e.get("action") == "promote" and e.get("tag") == tag
                 and e.get("stage") == stage), None)  # fmt: skip


def loop_challenger(reg: registry.Registry) -> str | None:
    """The challenger, if the loop staged it (someone else's challenger is not the loop's to judge)."""
    if reg.challenger is None:
        return None
    staged = next((e for e in reversed(reg.events) if e.get("action") == "promote" and e.get("tag") == reg.challenger
                   and e.get("stage") == "challenger"), None)  # fmt: skip
    return reg.challenger if staged is not None and staged.get("reason") == REASON else None


@dataclass
class LoopConfig:
    model_name: str
    events_path: str
    triggers: Triggers
    promote_on: PromoteOn
    max_wait_s: float
    margin: float
    settings: RecsysSettings
    train_args: argparse.Namespace  # the retrain options (data set, --events, model, engine)
    extra: dict[str, Any] = field(default_factory=dict)


def _decide_and_record(cfg: LoopConfig, decision: str, figures: dict[str, Any]) -> dict[str, Any]:
    event = {"action": ACTION, "decision": decision, **figures}
    registry.record(cfg.model_name, event)
    log.info("loop %s %s", decision, json.dumps(figures, default=str, sort_keys=True))
    return event


def drift_status(url: str) -> str | None:
    """GET {url}/drift's overall status, or None when the service does not answer."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/drift", timeout=10)
        resp.raise_for_status()
        return str(resp.json().get("status"))
    except (httpx.HTTPError, ValueError) as err:
        log.warning("loop: GET %s/drift failed (%s); the drift trigger does not fire", url, err)
        return None


def observe(cfg: LoopConfig, reg: registry.Registry, now: float) -> tuple[Observed, float]:
    """The figures of the triggers, and the event log's newest event time (the watermark)."""
    events = read_event_log(cfg.events_path)
    last = last_retrain(reg.events)
    since = float(last["events_until"]) if last and last.get("events_until") is not None else -math.inf
    new = int((events["ts"] > since).sum())
    until = float(events["ts"].max()) if len(events) else since
    age: float | None = None
    if reg.champion is not None:
        times = [t for t in (promoted_at(reg.events, reg.champion, "champion"), last and last.get("at")) if t]
        age = min((_seconds_since(t, now) for t in times), default=math.inf)
    drift = drift_status(cfg.triggers.drift_url) if cfg.triggers.drift_url else None
    retried = bool(last and "drift" in last.get("triggers", []) and last.get("champion") == reg.champion)
    return Observed(new, drift, age, retrained=last is not None, drift_retried=retried), until


def judge_challenger(cfg: LoopConfig, reg: registry.Registry, tag: str, now: float) -> dict[str, Any]:
    s = cfg.settings
    at = promoted_at(reg.events, tag, "challenger")
    waited = 0.0 if at is None else _seconds_since(at, now)
    figures: dict[str, Any] = {"challenger": tag, "champion": reg.champion, "waited_s": round(waited, 1)}
    try:
        report = build_report(read_event_log(cfg.events_path), read_impressions(cfg.events_path),
                              champion=reg.champion, challenger=tag, k=s.ab_k, window_s=s.outcome_window_s,
                              min_effect=s.ab_min_effect, alpha=s.ab_alpha, power=s.ab_power,
                              primary=s.ab_primary_metric)  # fmt: skip
        verdict: str | None = report.verdict
        primary = next(c for c in report.comparisons if c.metric == report.primary)
        figures["ab"] = {k: v for k, v in report.as_dict().items() if k in ("verdict", "primary_metric", "ci_method")}
        figures["ab"]["primary"] = {k: v for k, v in primary.as_dict().items() if not (isinstance(v, float) and not math.isfinite(v))}
    except NoTrafficError as err:
        verdict, figures["ab"] = None, {"verdict": None, "why": str(err)}
    action, why = judge(verdict, waited, cfg.max_wait_s)
    figures["reason"] = why
    if action == "promote":
        try:
            registry.promote(tag, "champion", reason=REASON, record={"loop": figures}, expected_champion=reg.champion)
        except registry.ChampionChanged as err:
            action, figures["reason"] = "clear", f"the champion changed from {err.expected} to {err.actual}"
    if action == "clear":
        registry.clear_challenger(cfg.model_name, reason=f"{REASON}: {figures['reason']}")
    return _decide_and_record(cfg, f"challenger_{action}", figures)


def retrain(cfg: LoopConfig, reg: registry.Registry, why: list[str], observed: Observed, until: float) -> dict[str, Any]:
    """Train on the base data plus the event log, gate it against the champion on the same
    forward-in-time hold-out, stage it (champion or challenger) if it passes."""
    from training.__main__ import load_dataset, train_config
    from training.pipeline import train

    champion = reg.champion
    started = time.monotonic()
    result = train(load_dataset(cfg.train_args), train_config(cfg.train_args), model_name=cfg.model_name, save=True,
                   compare_with=champion)  # fmt: skip
    assert result.tag is not None
    gate = decide(result.metrics, result.champion_metrics, cfg.margin)
    stage: registry.Stage = "champion" if cfg.promote_on == "offline" or champion is None else "challenger"
    figures: dict[str, Any] = {
        "triggers": why, "new_events": observed.new_events, "drift_status": observed.drift_status,
        "champion_age_s": None if observed.champion_age_s is None or not math.isfinite(observed.champion_age_s)
        else round(observed.champion_age_s, 1),
        "events_until": until if math.isfinite(until) else None, "tag": result.tag, "champion": champion,
        "gate": gate.as_record(), "train_s": round(time.monotonic() - started, 1), "staged": None,
    }  # fmt: skip
    if gate.promote:
        try:
            registry.promote(result.tag, stage, reason=REASON, record={"gate": gate.as_record()}, expected_champion=champion)
            figures["staged"] = stage
        except registry.ChampionChanged as err:
            figures["gate"]["reason"] = f"the champion changed from {err.expected} to {err.actual} during the run"
    return _decide_and_record(cfg, "retrain", figures)


def step(cfg: LoopConfig, now: float | None = None) -> dict[str, Any]:
    """One look; returns the decision recorded (action `loop`)."""
    now = time.time() if now is None else now
    reg = registry.load(cfg.model_name)
    challenger = loop_challenger(reg)
    if challenger is not None:
        return judge_challenger(cfg, reg, challenger, now)
    observed, until = observe(cfg, reg, now)
    why = fired(cfg.triggers, observed)
    if reg.challenger is not None:  # someone else's A/B test runs: do not replace its challenger
        why = []
    if not why:
        figures = {"new_events": observed.new_events, "drift_status": observed.drift_status,
                   "champion_age_s": None if observed.champion_age_s is None else round(observed.champion_age_s, 1),
                   "other_challenger": reg.challenger}  # fmt: skip
        log.info("loop idle %s", json.dumps(figures, default=str, sort_keys=True))
        return {"action": ACTION, "decision": "idle", **figures}
    return retrain(cfg, reg, why, observed, until)


def add_arguments(p: argparse.ArgumentParser, s: RecsysSettings) -> None:
    g = p.add_argument_group("loop (defaults: the RECSYS_LOOP_* settings)")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true", help="one look, then exit (a CronJob)")
    once.add_argument("--interval", type=float, default=s.loop_interval_s, help="seconds between looks")
    g.add_argument("--min-new-events", type=_optional(int), default=s.loop_min_new_events,
                   help="retrain after this many new events ('off': never on this trigger)")  # fmt: skip
    g.add_argument("--drift-url", default=s.loop_drift_url, help="the service whose /drift alert retrains ('off')")
    g.add_argument("--max-age", type=_optional(float), default=s.loop_max_age_s,
                   help="retrain when the champion is older than this many seconds ('off')")  # fmt: skip
    g.add_argument("--promote-on", choices=("offline", "online"), default=s.loop_promote_on)
    g.add_argument("--max-wait", type=float, default=s.loop_max_wait_s, help="seconds a challenger waits for the A/B sample")
    g.add_argument("--max-looks", type=int, default=None, help="stop after this many looks (tests, bounded runs)")


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("off", "none"):
            return None
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: a {kind.__name__} > 0, or 'off'") from err
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: a {kind.__name__} > 0, or 'off'")
        return value

    return parse


def build_parser(settings: RecsysSettings) -> argparse.ArgumentParser:
    """`retrain`'s options (the base data, --events, the model) and the loop's."""
    from training.__main__ import build_parser as retrain_parser

    p = retrain_parser(retrain=True)
    p.prog = "python -m training loop"
    p.description = ("Retrain on the base data plus the event log when a trigger fires, gate the new version "
                     "offline, then promote it or A/B-test it as the challenger (--stage is not used: "
                     "--promote-on decides).")  # fmt: skip
    add_arguments(p, settings)
    return p


def main(argv: list[str]) -> int:
    settings = RecsysSettings()
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.events = args.events or settings.event_log_path
    drift_url = None if (args.drift_url or "").lower() in ("", "off", "none") else args.drift_url
    cfg = LoopConfig(
        model_name=args.model_name or settings.model_name, events_path=args.events,
        triggers=Triggers(args.min_new_events, drift_url, args.max_age), promote_on=args.promote_on,
        max_wait_s=args.max_wait, margin=settings.promotion_margin if args.margin is None else args.margin,
        settings=settings, train_args=args,
    )  # fmt: skip
    looks = 0
    while True:
        try:
            decision = step(cfg)
        except (DataError, ModelCheckError, RegistryError) as err:
            print(f"error: {err}", file=sys.stderr)
            if args.once:
                return 2
            decision = {"decision": "error", "error": str(err)}
        if args.json:
            print(json.dumps(decision, default=str), flush=True)
        looks += 1
        if args.once or (args.max_looks is not None and looks >= args.max_looks):
            return 0
        time.sleep(args.interval)
