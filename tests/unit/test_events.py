"""The event's rules: each broken one names the event's index, the field and the rule."""

from __future__ import annotations

from typing import Any

import pytest

from models.serving.events import MAX_ID_CHARS, Event, Impression, InvalidEvent, parse_events

NOW = 1_700_000_000.0
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click"}


def parse(rows: list[dict[str, Any]], max_events: int = 10, max_future_s: float = 60.0) -> list[Event]:
    return parse_events(rows, NOW, max_events, max_future_s)


def test_a_good_event_gets_the_servers_time_and_floats() -> None:
    [event] = parse([GOOD])
    assert event == Event("e1", "u1", "i1", "click", NOW)
    [rated] = parse([{**GOOD, "type": "rating", "value": 4, "timestamp": 1_600_000_000}])
    assert isinstance(rated.timestamp, float) and rated.value == 4.0 and isinstance(rated.value, float)


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"event_id": ""}, "event_id", "1 to 256 characters"),
        ({"user_id": "x" * (MAX_ID_CHARS + 1)}, "user_id", "1 to 256 characters"),
        ({"item_id": 318}, "item_id", "a string"),
        ({"type": "like"}, "type", "one of view, click, add_to_cart, purchase, rating"),
        ({"timestamp": float("nan")}, "timestamp", "a finite number"),
        ({"timestamp": True}, "timestamp", "a number"),
        ({"timestamp": -1}, "timestamp", "at least 0"),
        ({"timestamp": NOW + 61}, "timestamp", "at most 60 s after the server's time"),
        ({"type": "rating"}, "value", "required for a 'rating' event"),
        ({"value": float("inf")}, "value", "a finite number"),
        ({"recommendation_id": ""}, "recommendation_id", "1 to 256 characters"),
        ({"score": 1}, "score", "a known field"),
    ],
)
def test_a_bad_event_fails_the_batch_naming_its_index_field_and_rule(change: dict[str, Any], field: str,
                                                                     rule: str) -> None:  # fmt: skip
    with pytest.raises(InvalidEvent) as info:
        parse([GOOD, GOOD, {**GOOD, **change}])
    assert (info.value.index, info.value.field) == (2, field)
    assert rule in info.value.rule and str(info.value).startswith(f"events[2].{field}: ")


@pytest.mark.parametrize("missing", ["event_id", "user_id", "item_id", "type"])
def test_a_missing_field_is_named(missing: str) -> None:
    with pytest.raises(InvalidEvent, match=rf"events\[0\]\.{missing}: None breaks the rule: required"):
        parse([{k: v for k, v in GOOD.items() if k != missing}])


@pytest.mark.parametrize("n", [0, 11])
def test_a_batch_holds_1_to_max_events(n: int) -> None:
    with pytest.raises(InvalidEvent, match="1 to 10 events in a batch"):
        parse([GOOD] * n)


def test_an_id_at_the_limit_in_characters_passes_whatever_its_bytes() -> None:
    text = "🎬" * MAX_ID_CHARS
    assert parse([{**GOOD, "event_id": text}])[0].event_id == text


def test_an_impression_checks_its_ids_and_items() -> None:
    assert Impression("r", "u", ("a", "b"), "v", "champion", 1).timestamp == 1.0
    with pytest.raises(InvalidEvent, match="items"):
        Impression("r", "u", ("a", ""), "v", "champion", 1.0)
    with pytest.raises(InvalidEvent, match="a tuple"):
        Impression("r", "u", ["a"], "v", "champion", 1.0)  # type: ignore[arg-type]
