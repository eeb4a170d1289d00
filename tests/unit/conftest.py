"""Unit-test fixtures: tables built from the small seeded dataset (no model store)."""

from __future__ import annotations

import pytest

from models.core.params import CandidateParams
from models.core.tables import ServingTables, build_tables
from training.datasets import Dataset


@pytest.fixture(scope="session")
def params() -> CandidateParams:
    return CandidateParams()


@pytest.fixture(scope="session")
def tables(synthetic_dataset: Dataset, params: CandidateParams) -> ServingTables:
    cat = synthetic_dataset.catalog
    return build_tables(synthetic_dataset.log, cat, cat.genre_names(), params)
