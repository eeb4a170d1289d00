"""Command line: `python -m training [--dataset synthetic|movielens|interactions] ...`
(train), and `python -m training drift-report ...` (see training/drift_report.py).

Trains a ranker, evaluates it against the baselines and saves a new version to the BentoML
model store (BENTOML_HOME). Exit status 2 with a one-line message for unusable data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from models.settings import RecsysSettings
from models.store import ModelCheckError
from training.datasets import DataError, Dataset, interactions, movielens, synthetic
from training.pipeline import RankerParams, TrainConfig, metrics_table, train

DATASETS = ("synthetic", "movielens", "interactions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, default="synthetic", help="default: synthetic")
    p.add_argument("--data", help="movielens: the folder with ratings.csv; interactions: the file")
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

    mdl = p.add_argument_group("model")
    defaults = RankerParams()
    mdl.add_argument("--windows", type=int, default=TrainConfig().n_windows, help="label windows")
    mdl.add_argument("--n-estimators", type=int, default=defaults.n_estimators)
    mdl.add_argument("--max-depth", type=int, default=defaults.max_depth)
    mdl.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    mdl.add_argument("--objective", choices=("rank:ndcg", "rank:pairwise"), default=defaults.objective)
    return p


def load_dataset(args: argparse.Namespace) -> Dataset:
    if args.dataset == "synthetic":
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "drift-report":
        from training import drift_report

        try:
            return drift_report.main(argv[1:])
        except (ModelCheckError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = TrainConfig(
        n_windows=args.windows,
        ranker=dataclasses.replace(
            RankerParams(),
            n_estimators=args.n_estimators,
            max_depth=args.max_depth,
            learning_rate=args.learning_rate,
            objective=args.objective,
        ),
    )
    model_name = args.model_name or RecsysSettings().model_name
    try:
        dataset = load_dataset(args)
        result = train(dataset, config, model_name=model_name, save=not args.dry_run)
    except (DataError, ModelCheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tag": result.tag, "metrics": result.metrics, "timings_s": result.timings}))
    else:
        print(metrics_table(result.metrics))
        print(f"candidate recall: {result.metrics['candidate_recall']:.4f}")
        print(f"model: {result.tag or '(dry run: not saved)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
