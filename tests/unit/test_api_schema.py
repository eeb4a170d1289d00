"""Request types: id coercion, feature rows named by the schema, finite numbers only."""

from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from models.core.schema import FEATURE_NAMES
from models.serving.api_schema import ExternalId, FeatureRow, input_error

ID = TypeAdapter(ExternalId)


@pytest.mark.parametrize("raw", ["u1", "318", "0", "x" * 256])
def test_ids_are_strings(raw: str) -> None:
    assert ID.validate_python(raw) == raw


@pytest.mark.parametrize("raw", [318, True, 1.5, None, "", "x" * 257, [1]])
def test_ids_reject_other_types(raw: object) -> None:
    with pytest.raises(ValidationError):
        ID.validate_python(raw)


def _row(**override: float) -> dict[str, float]:
    return {**dict.fromkeys(FEATURE_NAMES, 0.5), **override}


def test_feature_row_accepts_exactly_the_schema() -> None:
    row = FeatureRow.model_validate(_row())
    assert list(type(row).model_fields) == list(FEATURE_NAMES)
    assert FeatureRow.model_validate(_row(pop_rank=3)).pop_rank == 3.0  # JSON integers are numbers


@pytest.mark.parametrize(
    ("row", "error_type"),
    [
        (_row(cooc_score=math.nan), "finite_number"),
        (_row(cooc_score=math.inf), "finite_number"),
        ({**_row(), "not_a_feature": 1.0}, "extra_forbidden"),
        ({k: v for k, v in _row().items() if k != "pop_rank"}, "missing"),
        (_row(pop_rank="high"), "float_type"),  # type: ignore[arg-type]
        (_row(pop_rank="1.5"), "float_type"),  # type: ignore[arg-type]  strict: no strings
        (_row(pop_rank=True), "float_type"),  # type: ignore[arg-type]
    ],
    ids=["nan", "inf", "unknown column", "missing column", "not a number", "numeric string", "boolean"],
)
def test_feature_row_rejections_name_the_field(row: dict[str, object], error_type: str) -> None:
    with pytest.raises(ValidationError) as info:
        FeatureRow.model_validate(row)
    assert info.value.errors()[0]["type"] == error_type


def test_input_error_has_bentomls_400_shape() -> None:
    err = input_error("item_ids", "unknown_item_ids", "unknown item ids ['x']")
    (detail,) = err.errors()
    assert detail["loc"] == ("item_ids",)
    assert detail["type"] == "unknown_item_ids"
    assert detail["msg"] == "unknown item ids ['x']"
