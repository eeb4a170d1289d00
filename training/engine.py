"""The interface of a training engine that builds the labelled groups and fits the ranker
elsewhere (training/dask_engine.py). The pipeline depends on this, never on an engine: the
caller (`python -m training --engine ...`) picks one.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import xgboost as xgb

from models.core.params import CandidateParams
from models.core.tables import ServingTables
from training.split import Window


class Engine(Protocol):
    def describe(self) -> str:
        """Where it runs, for the version's lineage."""
        ...

    def add_window(self, tables: ServingTables, win: Window, params: CandidateParams,
                   eval_users: np.ndarray, qid_base: int, shuffle_seed: int | None) -> None:  # fmt: skip
        """Start building the labelled groups of one window."""
        ...

    def fit(self, ranker_kwargs: dict[str, Any], k: int) -> tuple[xgb.Booster, list[float], int, int, int]:
        """(booster up to the best round, validation curve, best round, train groups,
        validation groups)."""
        ...
