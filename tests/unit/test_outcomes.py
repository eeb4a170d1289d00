"""Online outcomes (models/core/outcomes.py): events joined to the impressions they refer
to, counts per version, the delta-method CI over users, the minimum sample, and no winner
called before it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.core.outcomes import attribute, compare, min_users, per_impression, per_variant, ratio_stats

IMPRESSIONS = pd.DataFrame({
    "recommendation_id": ["r1", "r2", "r3"], "user_id": ["a", "a", "b"],
    "items": [["x", "y", "z"], ["y", "w"], ["x", "y"]],
    "model_version": ["m:1", "m:1", "m:2"], "variant": ["champion", "champion", "challenger"],
    "ts": [100.0, 200.0, 150.0],
})  # fmt: skip


def events(*rows: tuple[str, str, str, str, float, str | None]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "type", "ts", "recommendation_id"])


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (("e", "a", "z", "click", 110.0, "r1"), ("r1", 3, "recommendation_id")),
        (("e", "a", "y", "click", 250.0, None), ("r2", 1, "window")),  # the latest impression showing y
        (("e", "a", "z", "click", 250.0, None), ("r1", 3, "window")),  # r2 did not show z
        (("e", "a", "y", "click", 250.0, "gone"), ("r2", 1, "window")),  # an id the log does not hold
        (("e", "a", "z", "click", 100.0 + 3601, None), None),  # outside the window
        (("e", "b", "z", "click", 160.0, None), None),  # never shown to b
        (("e", "a", "x", "click", 90.0, None), None),  # before any impression
    ],
    ids=["by-id", "window-latest", "window-older", "unknown-id", "too-late", "not-shown", "before"],
)
def test_attribution(event: tuple, expected: tuple[str, int, str] | None) -> None:
    out = attribute(events(event), IMPRESSIONS, window_s=3600)
    if expected is None:
        assert out.empty
    else:
        assert (out.loc[0, "recommendation_id"], out.loc[0, "position"], out.loc[0, "matched_by"]) == expected


def test_counts_per_version_and_variant() -> None:
    ev = events(("e1", "a", "y", "click", 110.0, "r1"), ("e2", "a", "y", "purchase", 120.0, "r1"),
                ("e3", "a", "z", "click", 111.0, "r1"), ("e4", "b", "y", "click", 160.0, "r3"),
                ("e5", "a", "w", "view", 210.0, "r2"))  # fmt: skip
    attributed = attribute(ev, IMPRESSIONS, 3600)
    rows = per_impression(IMPRESSIONS, attributed, k=10).set_index("recommendation_id")
    assert rows.loc["r1", "rr"] == 0.5 and rows.loc["r1", "purchased"] == 1  # first click at position 2
    assert rows.loc["r2", "clicked"] == 0 and rows.loc["r3", "rr"] == 0.5
    table = per_variant(IMPRESSIONS, attributed, k=10).set_index("model_version")
    assert table.loc["m:1", "impressions"] == 2 and table.loc["m:1", "clicks"] == 2
    assert table.loc["m:1", "purchases"] == 1 and table.loc["m:1", "ctr"] == 0.5
    assert table.loc["m:1", "mrr"] == 0.25 and table.loc["m:2", "conversion"] == 0.0
    # CTR@1: the clicks at position 2 do not count
    assert per_variant(IMPRESSIONS, attributed, k=1).set_index("model_version").loc["m:1", "ctr"] == 0.0


def test_min_users_is_the_textbook_two_proportion_size() -> None:
    """p = 0.1, a 10% relative change (0.01), alpha 0.05, power 0.8, one impression per user:
    (1.96 + 0.8416)^2 * 2 * 0.09 / 0.01^2 = 14,128 per arm."""
    assert min_users(0.09, 0.1, 0.1, 0.05, 0.8) == pytest.approx(14128, abs=2)
    assert min_users(0.09, 0.0, 0.1, 0.05, 0.8) is None  # no baseline to be relative to
    with pytest.raises(ValueError, match="alpha"):
        min_users(0.09, 0.1, 0.1, 1.5, 0.8)


def test_ratio_variance_over_users_exceeds_the_naive_one_when_users_cluster() -> None:
    """Users with 10 impressions each and their own click rates: the delta method's variance is
    larger than the impressions-as-independent p(1-p)/n."""
    rng = np.random.default_rng(0)
    rates = rng.beta(1, 4, size=500)
    users = np.repeat(np.arange(500), 10)
    clicks = rng.random(5000) < rates[users]
    stats = ratio_stats(clicks.astype(float), users)
    naive = stats.mean * (1 - stats.mean) / 5000
    assert stats.variance > 1.5 * naive


def _rows(rng: np.random.Generator, n_users: int, rate: float, version: str) -> pd.DataFrame:
    per_user = 4
    clicked = (rng.random(n_users * per_user) < rate).astype(np.int64)
    return pd.DataFrame({"user_id": np.repeat([f"{version}-{i}" for i in range(n_users)], per_user),
                         "model_version": version, "clicked": clicked, "purchased": clicked * 0,
                         "rr": clicked * 0.5})  # fmt: skip


@pytest.mark.parametrize(("n_users", "verdict"), [(30, "not enough data to decide"), (3000, "challenger worse")])
def test_a_worse_challenger_is_called_only_after_the_minimum_sample(n_users: int, verdict: str) -> None:
    rng = np.random.default_rng(n_users)
    rows = pd.concat([_rows(rng, n_users, 0.3, "champ"), _rows(rng, n_users, 0.15, "chall")])
    ctr = {c.metric: c for c in compare(rows, "champ", "chall", min_effect=0.2, alpha=0.05, power=0.8)}["ctr"]
    assert ctr.verdict == verdict
    assert ctr.ci_low < ctr.difference < ctr.ci_high
    if verdict == "challenger worse":
        assert ctr.ci_high < 0 and min(ctr.users) >= ctr.min_users
    else:
        assert ctr.min_users is not None and min(ctr.users) < ctr.min_users


def test_equal_arms_cover_zero_about_as_often_as_promised() -> None:
    """95% CIs of the difference between two arms of the same rate contain 0 in 90-99% of 200
    simulated tests, and no test with enough users calls a loser more than ~5% of the time."""
    rng = np.random.default_rng(7)
    covered = called = 0
    for _ in range(200):
        rows = pd.concat([_rows(rng, 400, 0.2, "champ"), _rows(rng, 400, 0.2, "chall")])
        ctr = compare(rows, "champ", "chall", min_effect=0.5, alpha=0.05, power=0.8)[0]
        covered += ctr.ci_low <= 0 <= ctr.ci_high
        called += ctr.verdict in ("challenger worse", "challenger better")
    assert 180 <= covered <= 198 and called <= 20


def test_no_data_is_not_enough_data() -> None:
    empty = pd.DataFrame({"user_id": [], "model_version": [], "clicked": [], "purchased": [], "rr": []})
    for c in compare(empty, "champ", "chall", min_effect=0.1, alpha=0.05, power=0.8):
        assert c.verdict == "not enough data to decide" and math.isnan(c.difference)
