"""Request and response types of the public API, as pydantic types (no BentoML here).

Validation lives in the types, so BentoML answers 400 with the field and the rule, and the
OpenAPI document (`/docs.json`) shows every limit.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictStr,
    create_model,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from models.core.candidates import CandidateSource
from models.core.schema import FEATURE_DTYPE, FEATURE_NAMES, FEATURES, N_FEATURES
from models.serving.events import EVENT_TYPES, MAX_ID_CHARS, InvalidEvent

# Ids are JSON strings, also where a dataset's ids are numbers ("318", not 318): one type,
# documented as it is validated (BentoML's OpenAPI keeps only the first member of a union).
ExternalId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS, description="An id (a string).")]
# Strict: JSON types only, so that e.g. "k": "10" or "exclude_seen": 0 are 400s, not guesses.
# Features are scored as float32: a value beyond its range would silently become infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)
StrictFiniteFloat = Annotated[float, Strict(), AllowInfNan(False), Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class RecommendedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="Ranker score; null when a fallback answered.")
    rank: int = Field(description="1-based position.")
    source: CandidateSource | None = Field(
        default=None,
        description="Which candidate generator proposed it: cooccurrence (with the user's recent "
        "items), ease (the learned item-item model, from the same items) or popularity (also "
        "every item of a cold-start fallback); null for /rank, whose items the client gave.",
    )
    title: str
    genres: list[str]


VARIANT_DESCRIPTION = "Which served version ranked it: champion or challenger."


RECOMMENDATION_ID_DESCRIPTION = ("The id this response's items are stored under (a uuid4 hex): send it "
                                 "with the events that follow from it (POST /events, recommendation_id).")


class HistoryInfo(BaseModel):
    trained: int = Field(description="Items of the user's history at training time.")
    online: int = Field(description="Items of the user's online events since (known to the model), "
                        "used with the trained ones.")


class RecommendResponse(BaseModel):
    user_id: str
    items: list[RecommendedItem]
    model_tag: str
    variant: str = Field(description=VARIANT_DESCRIPTION)
    recommendation_id: str = Field(description=RECOMMENDATION_ID_DESCRIPTION)
    history: HistoryInfo
    fallback: bool = Field(description="True when the ranker did not answer (cold start).")
    fallback_reason: str | None = None


class RankResponse(BaseModel):
    user_id: str
    items: list[RecommendedItem]
    model_tag: str
    variant: str = Field(description=VARIANT_DESCRIPTION)
    cold_start: bool = Field(description="True when the user has no history: neither trained nor online.")
    recommendation_id: str = Field(description=RECOMMENDATION_ID_DESCRIPTION)
    history: HistoryInfo


NonNegativeFiniteFloat = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0)]
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]


class EventIn(BaseModel):
    """One thing a user did (models/serving/events.py checks the rest: a rating needs a
    value, a timestamp at most RECSYS_EVENT_MAX_FUTURE_S ahead of the server's clock)."""

    model_config = ConfigDict(extra="forbid")

    event_id: ExternalId = Field(description="Chosen by the client: a retry with the same id changes nothing.")
    user_id: ExternalId
    item_id: ExternalId
    type: Literal[EVENT_TYPES] = Field(description="What the user did.")  # type: ignore[valid-type]
    timestamp: NonNegativeFiniteFloat | None = Field(
        None, description="Epoch seconds (UTC); default: the server's time.")
    value: FiniteFloat | None = Field(None, description="The rating of a 'rating' event (required there).")
    recommendation_id: ExternalId | None = Field(None, description="The response the event came from.")


class EventsResponse(BaseModel):
    new: int = Field(description="Events stored by this request.")
    duplicates: int = Field(description="Events whose event_id was seen before: they changed nothing.")
    unknown_items: list[str] = Field(
        description="Item ids the served model does not know: stored and counted, not used for candidates.")


def event_error(err: InvalidEvent) -> ValidationError:
    """A 400 for a bad event, located at events.<index>.<field> like pydantic's own."""
    loc: tuple[str | int, ...] = ("events",) if err.index is None else ("events", err.index, err.field)
    detail = InitErrorDetails(
        type=PydanticCustomError("invalid_event", "{reason}", {"reason": str(err)}), loc=loc, input=None
    )
    return ValidationError.from_exception_data("Input", [detail])


class ScoreResponse(BaseModel):
    scores: list[float]
    model_tag: str


class VersionInfo(BaseModel):
    tag: str
    creation_time: str
    metrics: dict[str, Any]
    dataset: dict[str, Any]
    feature_schema: list[dict[str, str]]
    schema_hash: str
    params: dict[str, Any]
    code_version: str
    versions: dict[str, str]

    @classmethod
    def of(cls, tag: str, creation_time: str, metadata: dict[str, Any]) -> VersionInfo:
        """From a version's stored metadata (the lineage training wrote)."""
        fields = set(cls.model_fields) - {"tag", "creation_time"}
        return cls(tag=tag, creation_time=creation_time, **{k: metadata[k] for k in fields})


class Routing(BaseModel):
    mode: str = Field(description="off, split or shadow (RECSYS_CHALLENGER_MODE).")
    challenger_share: float = Field(description="Share of users the challenger ranks in split mode.")


class ReloadInfo(BaseModel):
    """How this worker follows the registry (models/serving/reload.py)."""

    follows: bool = Field(description="Whether it follows the registry's stages (RECSYS_RELOAD_INTERVAL_S, "
                          "RECSYS_FOLLOW_REGISTRY; RECSYS_MODEL_TAG and a Bento's pins fix the versions).")
    interval_s: float = Field(description="Seconds between two looks at the registry.")
    checked_at: str | None = Field(description="When it last read the registry's stages (UTC).")
    switched_at: str | None = Field(description="When it last switched versions (UTC).")
    last_attempt: dict[str, Any] | None = Field(description="The last attempt to switch: at, from, to, "
                                                "result (switched, failed) and the error.")
    failures: int = Field(description="Attempts refused because a version failed its checks.")
    problem: str | None = Field(description="Why the stages could not be read at the last look.")
    refused: dict[str, str] = Field(description="Versions not switched in, with the check each failed.")


class ModelResponse(VersionInfo):
    """The champion's details, the challenger's (if one is loaded), the routing and how this
    worker follows the registry."""

    challenger: VersionInfo | None = None
    routing: Routing
    reload: ReloadInfo | None = None


# One field per schema feature, in schema order; unknown columns are rejected.
FeatureRow = create_model(  # type: ignore[call-overload]
    "FeatureRow",
    __config__=ConfigDict(extra="forbid"),
    **{f.name: (StrictFiniteFloat, Field(description=f.description)) for f in FEATURES},
)


_feature_values = operator.attrgetter(*FEATURE_NAMES)


def feature_matrix(rows: list[Any]) -> np.ndarray:
    """FeatureRows as a float32 matrix in schema order, with no Python code per row or per
    value (attrgetter and np.array loop in C): 10,000 rows took 7 ms against 20 ms for a getattr
    comprehension, in one measurement."""
    return np.array(list(map(_feature_values, rows)), dtype=FEATURE_DTYPE).reshape(len(rows), N_FEATURES)


def input_error(field: str, error_type: str, reason: str) -> ValidationError:
    """A 400 in the same shape as BentoML's own validation errors
    ({"error": ..., "detail": [{"type", "loc", "msg"}]}). Raising BentoML's InvalidArgument
    instead gives a differently shaped body (a list) in 1.4.40."""
    detail = InitErrorDetails(
        type=PydanticCustomError(error_type, "{reason}", {"reason": reason}), loc=(field,), input=None
    )
    return ValidationError.from_exception_data("Input", [detail])
