"""Labelled candidate groups, the training rows of the ranker: one group per (window, user),
its candidates with 0/1 labels. Both engines (this process and Dask) build them here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import xgboost as xgb
from tqdm import tqdm

from models.core.candidates import generate_candidates
from models.core.features import build_features
from models.core.params import CandidateParams
from models.core.tables import ServingTables
from training.datasets import DataError
from training.split import Window


@dataclass
class Groups:
    """Ranking groups: one per (window, user), rows sorted by qid as XGBRanker needs."""

    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    qid: list[np.ndarray] = field(default_factory=list)

    def add(self, x: np.ndarray, y: np.ndarray, qid: int) -> None:
        self.features.append(x)
        self.labels.append(y)
        self.qid.append(np.full(len(y), qid, dtype=np.int64))

    def arrays_check(self) -> None:
        if not self.features:
            raise DataError("no labelled groups: no user has a label item among its candidates")

    def n_rows(self) -> int:
        return sum(len(y) for y in self.labels)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.arrays_check()
        return np.vstack(self.features), np.concatenate(self.labels), np.concatenate(self.qid)

    def __len__(self) -> int:
        return len(self.features)


def label_items(win: Window, j: int) -> np.ndarray:
    return win.label_items[win.label_indptr[j] : win.label_indptr[j + 1]]


def labelled_groups(
    tables: ServingTables, win: Window, params: CandidateParams, rows: np.ndarray,
    shuffle: np.random.Generator | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(j, user, features, 0/1 labels) for the labelled users `win.label_users[rows]`.
    Users none of whose label items are among their candidates teach nothing and are skipped."""
    for j in tqdm(rows.tolist(), desc=f"window {win.index}", leave=False, disable=None):
        user = int(win.label_users[j])
        items, scores = generate_candidates(tables, user, params)
        y = np.isin(items, label_items(win, j)).astype(np.float32)
        if not y.any():
            continue
        if shuffle is not None:
            y = shuffle.permutation(y)
        yield j, user, build_features(tables, user, items, scores), y


def collect_groups(
    tables: ServingTables, win: Window, params: CandidateParams, eval_users: np.ndarray,
    train: Groups, valid: Groups, qid_base: int, shuffle: np.random.Generator | None = None,
) -> int:
    """Add each labelled user's candidates of this window, with 0/1 labels, to train or valid."""
    added = 0
    for j, user, x, y in labelled_groups(tables, win, params, np.arange(len(win.label_users)), shuffle):
        (valid if eval_users[user] else train).add(x, y, qid_base + j)
        added += 1
    return added


def best_rounds(ranker: xgb.XGBRanker, k: int) -> tuple[xgb.Booster, list[float], int]:
    """The booster up to the best validation round (the model we evaluate), the validation
    NDCG curve, and the best round."""
    curve = [float(v) for v in ranker.evals_result()["validation_0"][f"ndcg@{k}"]]
    best = int(ranker.best_iteration)
    return ranker.get_booster()[: best + 1], curve, best
