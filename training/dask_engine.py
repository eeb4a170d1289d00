"""Training on a Dask cluster: `python -m training --engine dask [--scheduler ADDRESS]`.

The labelled candidate groups are built on the workers, partitioned by blocks of users (one
task per block, the window's tables broadcast once), kept there as dask arrays whose chunks
hold whole query groups, and the ranker is fitted with `xgboost.dask.DaskXGBRanker` over the
workers. Only the fitted booster
comes back. Without an address a LocalCluster is started (and stopped) on this machine.

It fits the base ranker parameters (`TrainConfig.ranker`) once: the hyperparameter search of
training/tuning.py runs in-process only, and a Dask run ignores `TrainConfig.tune_budget_s`.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import numpy as np
import xgboost as xgb

from models.core.params import CandidateParams
from models.core.schema import FEATURE_NAMES
from models.core.tables import ServingTables
from training.datasets import DataError
from training.groups import Groups, best_rounds, labelled_groups
from training.split import Window

PARTS = ("x", "y", "qid")


def group_arrays(tables: ServingTables, win: Window, params: CandidateParams, rows: np.ndarray,
                 eval_users: np.ndarray, qid_base: int, shuffle_seed: int | None) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """One block of users: their labelled groups as numpy arrays (qid ascending, no group
    split), for training and for validation. numpy, not pandas: pickling pandas between
    workers was the slowest part of a run (minutes at 1M interactions)."""
    shuffle = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    train, valid = Groups(), Groups()
    for j, user, x, y in labelled_groups(tables, win, params, rows, shuffle):
        (valid if eval_users[user] else train).add(x, y, qid_base + j)
    out = {}
    for name, groups in (("train", train), ("valid", valid)):
        if len(groups):
            x, y, qid = groups.arrays()
        else:
            x, y, qid = np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        out[name] = {"x": x, "y": y, "qid": qid}
    return out


def _part(result: dict[str, dict[str, np.ndarray]], split: str, name: str) -> np.ndarray:
    return result[split][name]


def _sizes(result: dict[str, dict[str, np.ndarray]]) -> dict[str, tuple[int, int]]:
    return {split: (len(v["y"]), len(np.unique(v["qid"]))) for split, v in result.items()}


class DaskEngine:
    """A Dask client (and, without a scheduler address, its LocalCluster) for one run."""

    def __init__(self, scheduler: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
                 users_per_task: int = 5000) -> None:  # fmt: skip
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.users_per_task = users_per_task
        self._parts: list[Any] = []
        self.client: Any = None
        self._cluster: Any = None

    def __enter__(self) -> DaskEngine:
        from distributed import Client, LocalCluster

        if self.scheduler:
            self.client = Client(self.scheduler)
        else:
            self._cluster = LocalCluster(
                n_workers=self.n_workers, threads_per_worker=self.threads_per_worker,
                processes=True, dashboard_address=":0",  # any free port: never a clash
            )  # fmt: skip
            self.client = Client(self._cluster)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def describe(self) -> str:
        workers = len(self.client.scheduler_info().get("workers", {})) if self.client else 0
        return f"{self.scheduler or 'LocalCluster'}, {workers} workers"

    def add_window(self, tables: ServingTables, win: Window, params: CandidateParams,
                   eval_users: np.ndarray, qid_base: int, shuffle_seed: int | None) -> None:  # fmt: skip
        """Submit the group-building tasks of one window (they run while the next is built)."""
        n = len(win.label_users)
        if n == 0:
            return
        shared = [self.client.scatter(x, broadcast=True) for x in (tables, win, eval_users)]
        for c, rows in enumerate(np.array_split(np.arange(n), math.ceil(n / self.users_per_task))):
            seed = None if shuffle_seed is None else shuffle_seed * 1_000_003 + qid_base + c
            self._parts.append(self.client.submit(
                group_arrays, shared[0], shared[1], params, rows, shared[2], qid_base, seed, pure=False,
            ))  # fmt: skip

    def fit(self, ranker_kwargs: dict[str, Any], k: int) -> tuple[xgb.Booster, list[float], int, int, int]:
        """(booster up to the best round, validation curve, best round, train groups,
        validation groups)."""
        import dask.array as da
        from xgboost import dask as dxgb

        sizes = self.client.gather([self.client.submit(_sizes, f) for f in self._parts])
        data: dict[str, dict[str, Any]] = {}
        groups: dict[str, int] = {}
        for split in ("train", "valid"):
            keep = [(f, s[split][0]) for f, s in zip(self._parts, sizes) if s[split][0] > 0]
            groups[split] = sum(s[split][1] for s in sizes)
            if not keep:
                continue
            data[split] = {
                name: da.concatenate([
                    da.from_delayed(self.client.submit(_part, f, split, name, pure=False),
                                    shape=(n, len(FEATURE_NAMES)) if name == "x" else (n,),
                                    dtype=np.float32 if name != "qid" else np.int64)
                    for f, n in keep
                ])
                for name in PARTS
            }  # fmt: skip
        if groups["train"] < 10 or groups["valid"] < 2:
            raise DataError(f"too few labelled users to train ({groups['train']} train, {groups['valid']} "
                            "validation groups; rule: at least 10 and 2)")  # fmt: skip
        train, valid = data["train"], data["valid"]
        # Each block holds whole groups in qid order, so no group is split across partitions.
        ranker = dxgb.DaskXGBRanker(**ranker_kwargs, n_jobs=self.threads_per_worker, allow_group_split=True)
        ranker.client = self.client
        ranker.fit(train["x"], train["y"], qid=train["qid"],
                   eval_set=[(valid["x"], valid["y"])], eval_qid=[valid["qid"]])  # fmt: skip
        booster, curve, best = best_rounds(ranker, k)
        # Fitted on a DataFrame, the booster knows column names; serving passes numpy rows
        # in schema order, exactly like the in-process engine's booster.
        booster.feature_names = None
        booster.feature_types = None
        return booster, curve, best, groups["train"], groups["valid"]
