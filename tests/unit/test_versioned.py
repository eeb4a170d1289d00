"""Scoring rows that name their version: ids exact in float32, grouping by id, loading on
demand, refusals (never another version's booster)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pytest

from models.core.schema import FEATURE_DTYPE, N_FEATURES
from models.lifecycle.store import ModelCheckError
from models.serving.versioned import (
    ID_BITS,
    N_COLUMNS,
    BoosterSet,
    VersionNotHeld,
    split_rows,
    tag_rows,
    version_id,
)


class ConstantBooster:
    """Scores every row with one number: which booster scored a row shows in its score."""

    def __init__(self, value: float) -> None:
        self.value = value

    def inplace_predict(self, features: np.ndarray) -> np.ndarray:
        assert features.shape[1] == N_FEATURES  # the id column never reaches a booster
        return np.full(len(features), self.value, dtype=np.float32)


TAGS = {"m:a": 1.0, "m:b": 2.0, "m:c": 3.0}


def make_set(loadable: Iterable[str] = TAGS, known: Iterable[str] = TAGS) -> tuple[BoosterSet, list[str]]:
    loads: list[str] = []
    ok = set(loadable)

    def load(tag: str) -> ConstantBooster:
        if tag not in ok:
            raise ModelCheckError(f"model {tag}: digest check failed: ranker.ubj is corrupted or truncated")
        loads.append(tag)
        return ConstantBooster(TAGS[tag])

    return BoosterSet(load, lambda: list(known)), loads


def rows(*groups: tuple[str, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([tag_rows(version_id(t), rng.random((n, N_FEATURES), dtype=np.float32)) for t, n in groups])


@pytest.mark.parametrize("tag", ["recsys-ranker:2t27abcdqwe", "m:a", "x" * 300])
def test_version_id_is_stable_and_exact_in_float32(tag: str) -> None:
    vid = version_id(tag)
    assert 1 <= vid < 1 << ID_BITS
    assert vid == version_id(tag)
    assert int(np.float32(vid)) == vid
    ids, features = split_rows(tag_rows(vid, np.ones((3, N_FEATURES), dtype=FEATURE_DTYPE)))
    assert ids.tolist() == [vid] * 3 and features.shape == (3, N_FEATURES)


@pytest.mark.parametrize(
    ("matrix", "rule"),
    [
        (np.zeros((2, N_FEATURES), dtype=FEATURE_DTYPE), f"expected (n, {N_COLUMNS})"),
        (np.zeros((2, N_COLUMNS), dtype=FEATURE_DTYPE), "valid ids are integers"),
        (np.full((2, N_COLUMNS), 1.5, dtype=FEATURE_DTYPE), "valid ids are integers"),
    ],
    ids=["no id column", "id 0", "fractional id"],
)
def test_split_rows_refuses_rows_without_a_valid_id(matrix: np.ndarray, rule: str) -> None:
    with pytest.raises(ValueError, match=re.escape(rule)):
        split_rows(matrix)


@pytest.mark.parametrize(
    "groups",
    [[("m:a", 4)], [("m:a", 2), ("m:b", 3), ("m:a", 1)], [("m:b", 1), ("m:a", 1), ("m:b", 1)]],
    ids=["one version", "two versions interleaved", "alternating"],
)
def test_each_row_is_scored_by_the_booster_it_names(groups: list[tuple[str, int]]) -> None:
    boosters, _ = make_set()
    boosters.install(boosters.loaded(["m:a", "m:b"]))
    expected = [TAGS[t] for t, n in groups for _ in range(n)]
    assert boosters.score(rows(*groups)).tolist() == expected


def test_a_known_version_not_held_is_loaded_once_on_demand() -> None:
    boosters, loads = make_set()
    boosters.install(boosters.loaded(["m:a"]))
    assert boosters.score(rows(("m:c", 2), ("m:a", 1))).tolist() == [3.0, 3.0, 1.0]
    boosters.score(rows(("m:c", 1)))
    assert loads == ["m:a", "m:c"] and sorted(boosters.tags) == ["m:a", "m:c"]


@pytest.mark.parametrize(
    ("loadable", "known", "reason"),
    [(TAGS, ["m:a"], "no known tag has"), (["m:a"], TAGS, "cannot load: model m:c: digest check failed")],
    ids=["unknown id", "fails its checks"],
)
def test_rows_of_a_version_that_cannot_be_held_are_refused(loadable: list[str], known: list[str], reason: str) -> None:
    boosters, _ = make_set(loadable, known)
    boosters.install(boosters.loaded(["m:a"]))
    with pytest.raises(VersionNotHeld, match=reason):
        boosters.score(rows(("m:a", 1), ("m:c", 1)))
    assert boosters.tags == ["m:a"]


def test_loaded_reuses_held_boosters_and_refuses_an_id_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    boosters, loads = make_set()
    boosters.install(boosters.loaded(["m:a"]))
    held = boosters.loaded(["m:a", "m:b"])
    assert loads == ["m:a", "m:b"] and sorted(h.tag for h in held.values()) == ["m:a", "m:b"]
    monkeypatch.setattr("models.serving.versioned.version_id", lambda tag: 7)
    with pytest.raises(ModelCheckError, match="version id 7 collides with m:a"):
        boosters.loaded(["m:a", "m:b"])
