"""/score's matrix: built without Python per row, in schema order, exactly as the rows say."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.core.schema import FEATURE_DTYPE, FEATURE_NAMES
from models.serving.api_schema import FeatureRow, feature_matrix

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.lists(finite, min_size=len(FEATURE_NAMES), max_size=len(FEATURE_NAMES)), min_size=1, max_size=50))
def test_feature_matrix_is_the_rows_in_schema_order(values: list[list[float]]) -> None:
    rows = [FeatureRow(**dict(zip(FEATURE_NAMES, v))) for v in values]
    expected = np.array([[getattr(r, n) for n in FEATURE_NAMES] for r in rows], dtype=FEATURE_DTYPE)
    got = feature_matrix(rows)
    assert got.dtype == FEATURE_DTYPE and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
