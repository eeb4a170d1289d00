"""What users did and what they were shown: the event and the impression, as plain frozen
dataclasses, with the limits they are checked against.

No framework here: the API layer validates its JSON with pydantic and builds these; the online
state (models/serving/online/) stores them and the event log (models/serving/event_log.py)
writes them to Parquet. Times are epoch seconds as a float (an int is accepted and stored as
a float), in UTC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

EventType = Literal["view", "click", "add_to_cart", "purchase", "rating"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
# Every id's bound, the API's too (api_schema.ExternalId): in characters, not bytes (a
# 256-character id of 4-byte characters is 1 KiB of UTF-8).
MAX_ID_CHARS = 256
# Impressions are the responses of /recommend and /rank: at most their own item limits.
MAX_IMPRESSION_ITEMS = 10_000
EVENT_FIELDS = ("event_id", "user_id", "item_id", "type", "timestamp", "value", "recommendation_id")


class InvalidEvent(ValueError):
    """An event that breaks a rule; names the event's index in its batch, the field, the
    value and the rule, so that a 400 can say all of it."""

    def __init__(self, field: str, value: object, rule: str, index: int | None = None) -> None:
        self.field, self.value, self.rule, self.index = field, value, rule, index
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:80]}... ({len(shown)} characters)"
        where = f"events[{index}].{field}" if index is not None else field
        super().__init__(f"{where}: {shown} breaks the rule: {rule}")

    def at(self, index: int) -> InvalidEvent:
        return InvalidEvent(self.field, self.value, self.rule, index)


def _check_id(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidEvent(field, value, "a string")
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise InvalidEvent(field, value, f"1 to {MAX_ID_CHARS} characters (got {len(value)})")


def _check_number(field: str, value: object) -> None:
    # bool is an int to Python, but `true` is no timestamp or rating.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent(field, value, "a number")
    if not math.isfinite(value):
        raise InvalidEvent(field, value, "a finite number")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a user did. `event_id` is chosen by the client so that a retry is harmless;
    `value` is the rating of a `rating` event (required there, optional elsewhere, e.g. a
    price); `recommendation_id` names the response the event came from."""

    event_id: str
    user_id: str
    item_id: str
    type: EventType
    timestamp: float
    value: float | None = None
    recommendation_id: str | None = None

    def __post_init__(self) -> None:
        for field in ("event_id", "user_id", "item_id"):
            _check_id(field, getattr(self, field))
        if self.type not in EVENT_TYPES:
            raise InvalidEvent("type", self.type, f"one of {', '.join(EVENT_TYPES)}")
        _check_number("timestamp", self.timestamp)
        if self.timestamp < 0:
            raise InvalidEvent("timestamp", self.timestamp, "epoch seconds, at least 0")
        if self.value is not None:
            _check_number("value", self.value)
        elif self.type == "rating":
            raise InvalidEvent("value", None, "required for a 'rating' event")
        if self.recommendation_id is not None:
            _check_id("recommendation_id", self.recommendation_id)
        # One type inside: ints become floats, so that stores and Parquet see one dtype.
        object.__setattr__(self, "timestamp", float(self.timestamp))
        if self.value is not None:
            object.__setattr__(self, "value", float(self.value))


@dataclass(frozen=True, slots=True)
class Impression:
    """What one /recommend or /rank response showed: the items in order (position = index + 1),
    the model version that ranked them, the variant (champion, challenger, fallback...)."""

    recommendation_id: str
    user_id: str
    items: tuple[str, ...]
    model_version: str
    variant: str
    timestamp: float

    def __post_init__(self) -> None:
        _check_id("recommendation_id", self.recommendation_id)
        _check_id("user_id", self.user_id)
        if not isinstance(self.items, tuple):
            raise InvalidEvent("items", self.items, "a tuple of item ids")
        if len(self.items) > MAX_IMPRESSION_ITEMS:
            raise InvalidEvent("items", len(self.items), f"at most {MAX_IMPRESSION_ITEMS} items")
        for item in self.items:
            _check_id("items", item)
        _check_number("timestamp", self.timestamp)
        object.__setattr__(self, "timestamp", float(self.timestamp))


def check_batch(events: Sequence[Event], now: float, max_events: int, max_future_s: float) -> None:
    """The rules of a batch that the event alone cannot know: its size, and how far in the
    future a timestamp may be (a client clock ahead of ours, or a bug). Raises InvalidEvent."""
    if not 1 <= len(events) <= max_events:
        raise InvalidEvent("events", len(events), f"1 to {max_events} events in a batch")
    latest = now + max_future_s
    for i, event in enumerate(events):
        if event.timestamp > latest:
            raise InvalidEvent("timestamp", event.timestamp,
                               f"at most {max_future_s:g} s after the server's time ({now:.3f})", i)  # fmt: skip


def parse_events(rows: Sequence[Mapping[str, Any]], now: float, max_events: int, max_future_s: float) -> list[Event]:
    """Events from JSON-like mappings (all or nothing): a missing timestamp is `now`; an
    unknown field is an error (a typo must not pass as an event without its value)."""
    if not 1 <= len(rows) <= max_events:
        raise InvalidEvent("events", len(rows), f"1 to {max_events} events in a batch")
    events: list[Event] = []
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(EVENT_FIELDS))
        if unknown:
            raise InvalidEvent(unknown[0], row[unknown[0]], f"a known field: {', '.join(EVENT_FIELDS)}", i)
        for field in ("event_id", "user_id", "item_id", "type"):
            if field not in row:
                raise InvalidEvent(field, None, "required", i)
        try:
            events.append(Event(
                event_id=row["event_id"], user_id=row["user_id"], item_id=row["item_id"], type=row["type"],
                timestamp=now if row.get("timestamp") is None else row["timestamp"],
                value=row.get("value"), recommendation_id=row.get("recommendation_id"),
            ))  # fmt: skip
        except InvalidEvent as err:
            raise err.at(i) from err
    check_batch(events, now, max_events, max_future_s)
    return events
