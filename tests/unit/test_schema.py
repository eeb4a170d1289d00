"""The feature schema is the single source of truth; its hash must track every change."""

from __future__ import annotations

import numpy as np
import pytest

from models.core.candidates import UserScores
from models.core.features import build_features
from models.core.schema import (
    FEATURE_NAMES,
    FEATURES,
    ITEM_FEATURES,
    SCHEMA_HASH,
    USER_FEATURES,
    compute_schema_hash,
    schema_as_dict,
)
from models.core.tables import ServingTables


def test_names_are_unique_and_groups_valid() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert {f.group for f in FEATURES} <= {"user", "item", "user_item"}
    assert SCHEMA_HASH == compute_schema_hash(schema_as_dict())


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s[::-1],  # order
        lambda s: [{**s[0], "dtype": "float64"}, *s[1:]],  # dtype
        lambda s: [{**s[0], "name": "renamed"}, *s[1:]],  # name
        lambda s: s[:-1],  # a feature dropped
    ],
    ids=["order", "dtype", "name", "dropped"],
)
def test_any_schema_change_changes_the_hash(change) -> None:  # type: ignore[no-untyped-def]
    assert compute_schema_hash(change(schema_as_dict())) != SCHEMA_HASH


def test_tables_store_user_and_item_features_in_schema_order(tables: ServingTables) -> None:
    """build_features copies table columns into the schema's slots: the tables' column
    order must be the schema's order for each group."""
    user, items = 0, np.arange(min(5, tables.n_items), dtype=np.int32)
    x = build_features(tables, user, items, UserScores.empty())
    for j, name in enumerate(USER_FEATURES):
        assert np.allclose(x[:, FEATURE_NAMES.index(name)], tables.user_feats[user, j])
    for j, name in enumerate(ITEM_FEATURES):
        assert np.allclose(x[:, FEATURE_NAMES.index(name)], tables.item_feats[items, j])
