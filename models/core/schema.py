"""The ranking feature schema: the single source of truth for feature names, order and dtypes.

Training builds its matrices with these columns in this order, the ranking service scores
matrices with them, and `/score` validates records against them. The schema hash is saved
with every model version and checked when a version is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

FeatureGroup = Literal["user", "item", "user_item"]

FEATURE_DTYPE = np.float32


@dataclass(frozen=True)
class Feature:
    """One ranking feature: its column name, the entity it describes and what it means."""

    name: str
    group: FeatureGroup
    description: str
    dtype: str = "float32"


FEATURES: tuple[Feature, ...] = (
    Feature("user_log_count", "user", "log1p of the user's number of past interactions"),
    Feature("user_mean_item_pop", "user", "mean log1p popularity of the items the user had"),
    Feature("user_mean_year", "user", "mean release year of the user's items (-1: unknown)"),
    Feature("item_log_pop", "item", "log1p of the item's number of interactions"),
    Feature("item_log_pop_recent", "item", "log1p of its interactions in the latest 10% of time"),
    Feature("item_year", "item", "release year of the item (-1: unknown)"),
    Feature("item_mean_rating", "item", "mean rating of the item (0: no ratings)"),
    Feature("cooc_score", "user_item", "recency-weighted co-occurrence with the user's last items"),
    Feature("cooc_max", "user_item", "largest co-occurrence with any of the user's last items"),
    Feature("cooc_last", "user_item", "co-occurrence with the user's most recent item"),
    Feature("cooc_rank", "user_item", "rank of the item by cooc_score for this user (cap: none)"),
    Feature("ease_score", "user_item", "EASE score: sum of the item's weights from the user's last ease_history items"),
    Feature("ease_rank", "user_item", "rank of the item by ease_score for this user, capped at 1000 (also when unscored)"),
    Feature("pop_rank", "user_item", "log1p rank of the item by popularity"),
    Feature("genre_affinity", "user_item", "cosine of the user's genre profile and the item's"),
    Feature("year_gap", "user_item", "|item_year - user_mean_year| (-1: either unknown)"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
N_FEATURES = len(FEATURES)
USER_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "user")
ITEM_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "item")


def schema_as_dict() -> list[dict[str, str]]:
    """The schema as plain data (names, order, dtypes, groups), for model metadata."""
    return [{"name": f.name, "dtype": f.dtype, "group": f.group} for f in FEATURES]


def compute_schema_hash(schema: list[dict[str, str]]) -> str:
    """A stable digest of a schema; any change of name, order, dtype or group changes it."""
    payload = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


SCHEMA_HASH = compute_schema_hash(schema_as_dict())
