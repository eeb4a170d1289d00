"""Training on a Dask cluster: `python -m training --engine dask [--scheduler ADDRESS]`.

The labelled candidate groups are built in partitioned pandas on the workers (one task per
block of users, the window's tables broadcast once), kept there as a dask DataFrame, and the
ranker is fitted with `xgboost.dask.DaskXGBRanker` over the workers. Only the fitted booster
comes back. Without an address a LocalCluster is started (and stopped) on this machine.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from models.params import CandidateParams
from models.schema import FEATURE_NAMES
from models.tables import ServingTables
from training.datasets import DataError
from training.split import Window

LABEL, QID, VALID = "label", "qid", "valid"


def _meta() -> pd.DataFrame:
    frame = pd.DataFrame({n: pd.Series(dtype=np.float32) for n in FEATURE_NAMES})
    frame[LABEL] = pd.Series(dtype=np.float32)
    frame[QID] = pd.Series(dtype=np.int64)
    frame[VALID] = pd.Series(dtype=bool)
    return frame


def group_frame(tables: ServingTables, win: Window, params: CandidateParams, rows: np.ndarray,
                eval_users: np.ndarray, qid_base: int, shuffle_seed: int | None) -> pd.DataFrame:  # fmt: skip
    """One partition: the labelled groups of the users `win.label_users[rows]`, qid-sorted."""
    from training.pipeline import labelled_groups

    shuffle = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    frames = []
    for j, user, x, y in labelled_groups(tables, win, params, rows, shuffle):
        frame = pd.DataFrame(x, columns=list(FEATURE_NAMES))
        frame[LABEL] = y
        frame[QID] = np.int64(qid_base + j)
        frame[VALID] = bool(eval_users[user])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else _meta()


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
                processes=True, dashboard_address=None,
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
                group_frame, shared[0], shared[1], params, rows, shared[2], qid_base, seed, pure=False,
            ))  # fmt: skip

    def fit(self, ranker_kwargs: dict[str, Any], k: int) -> tuple[xgb.Booster, list[float], int, int, int]:
        """(booster up to the best round, validation curve, best round, train groups,
        validation groups)."""
        import dask.dataframe as dd
        from xgboost import dask as dxgb

        from training.pipeline import best_rounds

        groups = dd.from_delayed(self._parts, meta=_meta(), verify_meta=False).persist()
        train, valid = groups[~groups[VALID]], groups[groups[VALID]]
        n_train, n_valid = (int(x) for x in self.client.compute([train[QID].nunique(), valid[QID].nunique()], sync=True))
        if n_train < 10 or n_valid < 2:
            raise DataError(f"too few labelled users to train ({n_train} train, {n_valid} validation groups; "
                            "rule: at least 10 and 2)")  # fmt: skip
        features = list(FEATURE_NAMES)
        ranker = dxgb.DaskXGBRanker(**ranker_kwargs, n_jobs=self.threads_per_worker)
        ranker.client = self.client
        ranker.fit(train[features], train[LABEL], qid=train[QID],
                   eval_set=[(valid[features], valid[LABEL])], eval_qid=[valid[QID]])  # fmt: skip
        booster, curve, best = best_rounds(ranker, k)
        # Fitted on a DataFrame, the booster knows column names; serving passes numpy rows
        # in schema order, exactly like the in-process engine's booster.
        booster.feature_names = None
        booster.feature_types = None
        return booster, curve, best, n_train, n_valid
