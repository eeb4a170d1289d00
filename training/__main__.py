"""Command line: `python -m training [options]` trains; `python -m training COMMAND ...`
runs one of `COMMANDS` (models and retrain: training/lifecycle.py, replay:
training/replay.py, drift-report: training/drift_report.py, generate: below).

Training fits a ranker, evaluates it against the baselines and saves a new version to the
BentoML model store (BENTOML_HOME). Exit status 2 with a one-line message for unusable data.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import sys
import textwrap
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from models.lifecycle import registry
from models.lifecycle.registry import RegistryError
from models.lifecycle.store import ModelCheckError
from models.serving.settings import RecsysSettings
from training.dask_engine import DaskEngine
from training.datasets import (
    EVENT_TYPES,
    DataError,
    Dataset,
    interactions,
    movielens,
    synthetic,
    with_events,
    write_synthetic,
)
from training.lifecycle import Decision, decide, models_main
from training.pipeline import TrainConfig, TrainResult, metrics_table, train
from training.ranker import RankerParams
from training.split import SPLIT_KINDS, SplitConfig

DATASETS = ("synthetic", "movielens", "interactions")
TRAIN_DESCRIPTION = ("Train a ranker, evaluate it against the baselines and save a new version to the "
                     "BentoML model store (BENTOML_HOME).")  # fmt: skip
# The subcommands, in the order the top-level help lists them; plain options mean training.
COMMANDS = {
    "models": "list, show, compare, promote or roll back versions and stages",
    "retrain": "train a challenger; promote it unless worse than the champion",
    "replay": "replay the champion's logged requests against a challenger",
    "drift-report": "HTML report of logged features and scores against the reference",
    "generate": "write a partitioned synthetic data set (Parquet) to train on",
    "loop": "retrain on the event log when triggered, gate, A/B-judge and promote, by itself",
}


def _top_level_help() -> str:
    width = max(map(len, COMMANDS)) + 2
    rows = "\n".join(f"  {name.ljust(width)}{text}" for name, text in COMMANDS.items())
    return (f"{textwrap.fill(TRAIN_DESCRIPTION, 80)}\n\n"
            f"commands (python -m training COMMAND --help for each):\n{rows}\n\n"
            "Without a command, the options below train a new version.")  # fmt: skip


def build_parser(retrain: bool = False) -> argparse.ArgumentParser:
    if retrain:
        p = argparse.ArgumentParser(
            prog="python -m training retrain",
            description="Train a challenger on new data, evaluate it and the champion on the same "
            "fresh hold-out, and promote it unless it is worse by more than the margin.",
        )
    else:
        p = argparse.ArgumentParser(
            prog="python -m training",
            usage="%(prog)s [options]\n       %(prog)s {" + ",".join(COMMANDS) + "} [-h] ...",
            description=_top_level_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: synthetic; with --events and no --dataset: the event log alone")  # fmt: skip
    p.add_argument("--data", help="movielens: the folder with ratings.csv; interactions: the file")
    p.add_argument("--events", default=None, metavar="PATH",
                   help="the service's event log (RECSYS_EVENT_LOG_PATH: a folder or a URL), alone or on "
                   "top of --dataset; users and items join by id, every event of --event-types is an "
                   "interaction (one per user and item)")  # fmt: skip
    p.add_argument("--event-types", type=_event_types, default=EVENT_TYPES, metavar="TYPES",
                   help=f"comma-separated event types that count (default: all, {','.join(EVENT_TYPES)})")
    p.add_argument("--model-name", default=None, help="store name (default: RECSYS_MODEL_NAME)")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate, save nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    syn = p.add_argument_group("synthetic data")
    syn.add_argument("--n-users", type=int, default=3000)
    syn.add_argument("--n-items", type=int, default=2000)
    syn.add_argument("--n-interactions", type=int, default=150_000, help="draws before de-duplication")
    syn.add_argument("--seed", type=int, default=7)

    gen = p.add_argument_group("generic interactions file (CSV or Parquet)")
    gen.add_argument("--user-col", default="user_id")
    gen.add_argument("--item-col", default="item_id")
    gen.add_argument("--time-col", default="timestamp", help="epoch seconds or ISO dates")
    gen.add_argument("--rating-col", default=None, help="optional")
    gen.add_argument("--items", default=None, help="optional item file: id, title, genres (a|b), year")
    gen.add_argument("--items-id-col", default="item_id")
    gen.add_argument("--title-col", default="title")
    gen.add_argument("--genres-col", default="genres")
    gen.add_argument("--year-col", default=None, help="default: a (YYYY) at the end of the title")

    eng = p.add_argument_group("engine")
    eng.add_argument("--engine", choices=("local", "dask"), default="local",
                     help="local: this process; dask: candidates and the ranker on a Dask cluster")  # fmt: skip
    eng.add_argument("--scheduler", default=None,
                     help="Dask scheduler address (tcp://host:8786); default: a LocalCluster here")  # fmt: skip
    eng.add_argument("--dask-workers", type=int, default=2, help="LocalCluster workers (default 2)")

    mdl = p.add_argument_group("model", "--n-estimators, --max-depth, --learning-rate and --objective set the base\n"
                               "parameters, the first trial of the tuning.")  # fmt: skip
    defaults, config = RankerParams(), TrainConfig()
    mdl.add_argument("--windows", type=int, default=config.n_windows, help="label windows")
    mdl.add_argument("--tune-budget", type=_seconds, default=config.tune_budget_s, metavar="SECONDS",
                     help="seconds of ranker hyperparameter search on the validation groups, at most "
                     f"{config.tune_max_trials} trials (0: the base parameters only; default {config.tune_budget_s:g})")  # fmt: skip
    mdl.add_argument("--split", choices=SPLIT_KINDS, default=SplitConfig().kind,
                     help="temporal: a global cutoff in time (honest); per_user: each user's last items")  # fmt: skip
    mdl.add_argument("--n-estimators", type=int, default=defaults.n_estimators)
    mdl.add_argument("--max-depth", type=int, default=defaults.max_depth)
    mdl.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    mdl.add_argument("--objective", choices=("rank:ndcg", "rank:pairwise"), default=defaults.objective)
    mdl.add_argument("--shuffle-labels", action="store_true",
                     help="sanity check of the promotion gate: train on permuted labels")  # fmt: skip

    stage = p.add_argument_group("promotion")
    if retrain:
        stage.add_argument("--margin", type=float, default=None,
                           help="allowed NDCG@10 shortfall against the champion (default: RECSYS_PROMOTION_MARGIN)")  # fmt: skip
        stage.add_argument("--stage", choices=registry.STAGES, default="champion",
                           help="the stage a challenger that passes gets (challenger: for a split or shadow test first)")  # fmt: skip
    else:
        stage.add_argument("--promote", action="store_true",
                           help="make the new version the champion (the first version always becomes it if it "
                           "beats the co-occurrence baseline)")  # fmt: skip
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _event_types(text: str) -> tuple[str, ...]:
    types = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in types if t not in EVENT_TYPES]
    if bad or not types:
        raise argparse.ArgumentTypeError(f"{text!r}: valid types are {', '.join(EVENT_TYPES)} (one or more, comma-separated)")
    return types


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration the options ask for."""
    return TrainConfig(
        split=SplitConfig(kind=args.split),
        n_windows=args.windows,
        ranker=dataclasses.replace(
            RankerParams(),
            n_estimators=args.n_estimators,
            max_depth=args.max_depth,
            learning_rate=args.learning_rate,
            objective=args.objective,
        ),
        tune_budget_s=args.tune_budget,
        shuffle_labels=args.shuffle_labels,
    )


def load_dataset(args: argparse.Namespace) -> Dataset:
    """The data the options name: --dataset (default synthetic), with --events on top; or
    --events alone (no --dataset), with the generic --items options for its item file."""
    if args.events is None:
        return load_base(args)
    if args.dataset is None:
        return with_events(None, args.events, args.event_types, items_path=args.items, items_id_col=args.items_id_col,
                           title_col=args.title_col, genres_col=args.genres_col, year_col=args.year_col)  # fmt: skip
    return with_events(load_base(args), args.events, args.event_types)


def load_base(args: argparse.Namespace) -> Dataset:
    if args.dataset in (None, "synthetic"):
        return synthetic(args.n_users, args.n_items, args.n_interactions, seed=args.seed)
    if not args.data:
        raise DataError(f"--dataset {args.dataset} needs --data PATH")
    if args.dataset == "movielens":
        return movielens(args.data)
    return interactions(
        args.data,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        rating_col=args.rating_col,
        items_path=args.items,
        items_id_col=args.items_id_col,
        title_col=args.title_col,
        genres_col=args.genres_col,
        year_col=args.year_col,
    )


# Named shapes for `generate`: (users, items, draws, partitions). ml-25m: MovieLens 25M's
# users and items; 35.4M draws leave about 25.0M interactions after de-duplication
# (measured on two partitions of this shape: 24.9M at 35.3M draws).
GENERATE_SHAPES: dict[str, tuple[int, int, int, int]] = {"ml-25m": (162_541, 59_047, 35_400_000, 50)}


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training generate",
        description="Write a partitioned synthetic data set (Parquet), one partition in memory at a time.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for interactions/ and items.parquet")
    p.add_argument("--shape", choices=sorted(GENERATE_SHAPES), default=None,
                   help="a named shape: ml-25m = 162,541 users, 59,047 items, ~25M interactions (the "
                        "sizes below override it)")  # fmt: skip
    p.add_argument("--n-users", type=int, default=None, help="default 100,000")
    p.add_argument("--n-items", type=int, default=None, help="default 20,000")
    p.add_argument("--n-interactions", type=int, default=None, help="draws before de-duplication (default 10M)")
    p.add_argument("--partitions", type=int, default=None, help="default 20")
    p.add_argument("--seed", type=int, default=7)
    return p


def generate_main(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    sizes = GENERATE_SHAPES[args.shape] if args.shape else (100_000, 20_000, 10_000_000, 20)
    n_users, n_items, n_interactions, partitions = (
        given if given is not None else default
        for given, default in zip((args.n_users, args.n_items, args.n_interactions, args.partitions), sizes)
    )  # fmt: skip
    try:
        folder, items = write_synthetic(args.out, n_users, n_items, n_interactions, partitions, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"interactions: {folder}  items: {items}")
    print(f"train on it: python -m training --dataset interactions --data {folder} --items {items} "
          "--user-col user_id --item-col item_id --time-col ts --rating-col rating")  # fmt: skip
    return 0


def _unknown_command(word: str) -> str:
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown command '{word}'; valid: {', '.join(COMMANDS)}{hint}"


def _subcommand(argv: list[str]) -> int | None:
    """The exit status of the command `argv[0]`, or None for training (options only)."""
    if not argv or argv[0].startswith("-") or argv[0] == "retrain":
        return None
    if argv[0] not in COMMANDS:
        build_parser().error(_unknown_command(argv[0]))  # exits 2
    from training import drift_report, loop, replay

    mains: dict[str, Callable[[list[str]], int]] = {
        "models": models_main, "replay": replay.main, "drift-report": drift_report.main,
        "generate": generate_main, "loop": loop.main,
    }  # fmt: skip
    try:
        return mains[argv[0]](argv[1:])
    except (ModelCheckError, RegistryError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _stage_new_version(result: TrainResult, args: argparse.Namespace, model_name: str, retrain: bool,
                       margin: float, evaluated: str | None) -> Decision | None:  # fmt: skip
    """Retrain: the gate decides, and the decision is recorded either way. Train: the first
    version (if it learned something) or --promote makes the champion.

    `evaluated` is the champion the run was judged against (read before training): the gate's
    promotion, and the first version's, are compare-and-swaps on it, so a champion promoted
    by someone else meanwhile is never replaced by a version that was not compared with it."""
    assert result.tag is not None
    if retrain:
        decision = decide(result.metrics, result.champion_metrics, margin)
        record = {"decision": decision.as_record(), "challenger_metrics": result.metrics,
                  "champion": evaluated, "champion_metrics": result.champion_metrics}  # fmt: skip
        if decision.promote:
            return _promote_if_unchanged(result.tag, args.stage, "retrain", decision, record, evaluated)
        registry.record(model_name, {"action": "reject", "tag": result.tag, "reason": "retrain", **record})
        return decision
    if args.promote:
        registry.promote(result.tag, "champion", reason="train --promote")
    elif registry.load(model_name).champion is None:
        decision = decide(result.metrics, None, margin)
        if decision.promote:
            return _promote_if_unchanged(result.tag, "champion", "first version", decision, {}, None)
        return decision
    return None


def _promote_if_unchanged(tag: str, stage: registry.Stage, reason: str, decision: Decision,
                          record: dict[str, Any], evaluated: str | None) -> Decision:  # fmt: skip
    try:
        registry.promote(tag, stage, reason=reason, record=record, expected_champion=evaluated)
    except registry.ChampionChanged as err:  # recorded in the registry as `promote_refused`
        why = f"the champion changed from {err.expected} to {err.actual} during the run"
        return dataclasses.replace(decision, promote=False, reason=why)
    return decision


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code = _subcommand(argv)
    if code is not None:
        return code
    retrain = bool(argv) and argv[0] == "retrain"
    args = build_parser(retrain).parse_args(argv[1:] if retrain else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = train_config(args)
    settings = RecsysSettings()
    model_name = args.model_name or settings.model_name
    margin = settings.promotion_margin if not retrain or args.margin is None else args.margin
    try:
        champion = registry.load(model_name).champion if retrain else None
        dataset = load_dataset(args)
        engine = DaskEngine(args.scheduler, args.dask_workers) if args.engine == "dask" else nullcontext(None)
        with engine as running:
            result = train(dataset, config, model_name=model_name, save=not args.dry_run,
                           compare_with=champion, engine=running)  # fmt: skip
        decision: Decision | None = None
        if not args.dry_run:
            decision = _stage_new_version(result, args, model_name, retrain, margin, champion)
    except (DataError, ModelCheckError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stages = registry.load(model_name)
    out = {
        "tag": result.tag, "metrics": result.metrics, "timings_s": result.timings,
        "peak_rss_mb": result.peak_rss_mb,
        "champion_metrics": result.champion_metrics,
        "decision": decision.as_record() if decision else None,
        "champion": stages.champion, "challenger": stages.challenger,
    }  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        print(metrics_table(result.metrics))
        print(f"candidate recall: {result.metrics['candidate_recall']:.4f}")
        if result.champion_metrics is not None:
            print(f"champion {champion} on the same hold-out:\n{metrics_table(result.champion_metrics)}")
        print(f"model: {result.tag or '(dry run: not saved)'}")
        if decision is not None:
            print(f"decision: {'promoted' if decision.promote else 'not promoted'} ({decision.reason})")
        print(f"champion: {stages.champion}; challenger: {stages.challenger}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
