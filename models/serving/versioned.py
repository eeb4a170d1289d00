"""Scoring calls that name their version, so the two services never mix versions.

BentoML 1.4's batchable APIs take exactly one argument ("Batch inference function only
accept one argument", `_bentoml_impl/server/app.py: batch_infer`), so the version travels
inside the matrix: one leading column holds a 24-bit id of the version's tag, exact in
float32 (its significand has 24 bits). Rows of different versions can then share a batch
(adaptive batching in the ranking service, JoinedCalls in the API) and the ranking service
scores each group of rows with the booster of the version it names, or refuses them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.core.ranking import predict_scores
from models.core.schema import FEATURE_DTYPE, N_FEATURES
from models.lifecycle.store import ModelCheckError

if TYPE_CHECKING:
    import xgboost as xgb

ID_BITS = 24  # float32 holds every integer up to 2**24 exactly
N_COLUMNS = N_FEATURES + 1  # the version id, then the schema's features
log = logging.getLogger("recsys.reload")


class VersionNotHeld(LookupError):
    """Rows name a version this ranking service does not hold and cannot load; retryable
    (another ranking service, or this one a moment later, may hold it)."""


def version_id(tag: str) -> int:
    """A stable id of `tag` in [1, 2**24): the same in every process (Python's hash() is
    salted per process). 0 is never an id, so a row of zeros names no version."""
    digest = hashlib.blake2b(tag.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % ((1 << ID_BITS) - 1) + 1


def tag_rows(vid: int, features: np.ndarray) -> np.ndarray:
    """`features` (n, N_FEATURES) with the version id as a leading column, float32."""
    out = np.empty((len(features), N_COLUMNS), dtype=FEATURE_DTYPE)
    out[:, 0] = vid
    out[:, 1:] = features
    return out


def split_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The version ids (int64) and the feature rows of a tagged matrix; ValueError when the
    shape is not (n, N_COLUMNS) or an id is not an integer in [1, 2**24)."""
    if matrix.ndim != 2 or matrix.shape[1] != N_COLUMNS:
        raise ValueError(f"features: shape {matrix.shape}, expected (n, {N_COLUMNS}): "
                         f"a version id column, then the {N_FEATURES} schema features")  # fmt: skip
    raw = matrix[:, 0]
    ids = raw.astype(np.int64)
    bad = (ids != raw) | (ids < 1) | (ids >= 1 << ID_BITS)
    if bad.any():
        raise ValueError(f"features: column 0 (the version id) holds {raw[bad][:5].tolist()}; "
                         f"valid ids are integers in [1, {1 << ID_BITS})")  # fmt: skip
    return ids, matrix[:, 1:].astype(FEATURE_DTYPE, copy=False)


@dataclass(frozen=True)
class HeldBooster:
    tag: str
    booster: xgb.Booster


class BoosterSet:
    """The boosters one ranking worker holds, by version id. Each group of rows is scored by
    the booster its id names; an id not held is looked up among `candidates()` (the tags the
    registry and the store know), loaded by `load(tag)` with its checks, and kept; if none
    matches or its checks fail, the rows are refused (VersionNotHeld), never scored by
    another version's booster. Safe across threads (BentoML scores in a thread pool)."""

    def __init__(self, load: Callable[[str], Any], candidates: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self._candidates = candidates
        self._held: dict[int, HeldBooster] = {}  # replaced whole, never changed in place
        self._lock = threading.Lock()

    @property
    def tags(self) -> list[str]:
        return [h.tag for h in self._held.values()]

    def booster_of(self, tag: str) -> Any | None:
        held = self._held.get(version_id(tag))
        return held.booster if held is not None and held.tag == tag else None

    def loaded(self, tags: Iterable[str], reuse: bool = True) -> dict[int, HeldBooster]:
        """Boosters of `tags`, those held reused: the held set a switch will install
        (ModelCheckError when a version fails its checks or two tags share an id)."""
        out: dict[int, HeldBooster] = {}
        for tag in dict.fromkeys(tags):
            vid = version_id(tag)
            if vid in out and out[vid].tag != tag:
                raise ModelCheckError(f"model {tag}: version id {vid} collides with {out[vid].tag}; "
                                      "save the version again (a new tag) to serve both")  # fmt: skip
            booster = self.booster_of(tag) if reuse else None
            out[vid] = HeldBooster(tag, booster if booster is not None else self._load(tag))
        return out

    def install(self, held: dict[int, HeldBooster]) -> None:
        with self._lock:
            self._held = dict(held)

    def _hold_on_demand(self, vid: int) -> HeldBooster:
        with self._lock:
            if vid in self._held:  # another thread loaded it meanwhile
                return self._held[vid]
            tag = next((t for t in self._candidates() if version_id(t) == vid), None)
            if tag is None:
                raise VersionNotHeld(f"rows name version id {vid}, which this ranking service does not "
                                     f"hold ({', '.join(self.tags) or 'none'}) and no known tag has")  # fmt: skip
            try:
                held = HeldBooster(tag, self._load(tag))
            except ModelCheckError as err:
                raise VersionNotHeld(f"rows name {tag}, which this ranking service cannot load: {err}") from err
            self._held = {**self._held, vid: held}
        log.warning("loaded %s on demand: a caller named it before this ranking worker's poll did", tag)
        return held

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Scores of a tagged matrix, each row by the booster its version id names."""
        ids, features = split_rows(matrix)
        if len(ids) == 0:
            return np.zeros(0, dtype=FEATURE_DTYPE)
        first = int(ids[0])
        if (ids == first).all():  # the usual batch: one version, no copies
            return predict_scores(self._get(first).booster, features)
        out = np.empty(len(ids), dtype=FEATURE_DTYPE)
        for vid in np.unique(ids):
            rows = ids == vid
            out[rows] = predict_scores(self._get(int(vid)).booster, features[rows])
        return out

    def _get(self, vid: int) -> HeldBooster:
        held = self._held.get(vid)
        return held if held is not None else self._hold_on_demand(vid)
