"""Online outcomes per model version: what users did with what each version showed.

Events are joined to the impressions they refer to (by `recommendation_id`, else the same
user's latest impression that showed the item within an attribution window), then counted
per model version and variant: impressions, clicks, purchases, CTR@k, conversion, and the
mean reciprocal rank of the first clicked item. `compare` puts a challenger beside the
champion: each metric's difference with a confidence interval and the minimum sample to
decide; before that sample it refuses to call a winner.

The unit of the statistics is the user, not the impression: split mode routes users, and one
user's impressions are not independent. Each metric is a ratio of per-user sums (e.g. clicked
impressions / impressions), so its variance is the delta method's over users (Deng, Knoblich
and Lu, "Applying the Delta Method in Metric Analytics", KDD 2018).

Pure pandas/numpy on the frames of the event log (models/serving/event_log.py: events with
event_id, user_id, item_id, type, ts, recommendation_id; impressions with recommendation_id,
user_id, items, model_version, variant, ts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

CLICK_TYPES = ("click",)
PURCHASE_TYPES = ("purchase",)
METRICS = ("ctr", "conversion", "mrr")
CI_METHOD = "delta-method normal CI over users (ratio metrics, Deng et al. 2018)"
ATTRIBUTED_COLUMNS = ["event_id", "user_id", "item_id", "type", "ts", "recommendation_id", "model_version",
                      "variant", "position", "matched_by"]  # fmt: skip


def shown_items(impressions: pd.DataFrame) -> pd.DataFrame:
    """One row per shown item: recommendation_id, user_id, item_id, position (1-based),
    model_version, variant, ts (of the impression)."""
    if impressions.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in [
            ("recommendation_id", object), ("user_id", object), ("item_id", object), ("position", np.int64),
            ("model_version", object), ("variant", object), ("ts", np.float64)]})  # fmt: skip
    base = impressions[["recommendation_id", "user_id", "items", "model_version", "variant", "ts"]]
    lengths = base["items"].map(len).to_numpy()
    shown = base.drop(columns="items").loc[base.index.repeat(lengths)].reset_index(drop=True)
    shown["item_id"] = np.concatenate([np.asarray(list(i), dtype=object) for i in base["items"]]) if lengths.sum() else []
    shown["position"] = np.concatenate([np.arange(1, n + 1) for n in lengths]) if lengths.sum() else []
    return shown.astype({"position": np.int64, "ts": np.float64})


def attribute(events: pd.DataFrame, impressions: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """Each event that refers to a shown item, with the impression's version, variant and the
    item's position: by its `recommendation_id` when that impression showed the item
    (matched_by "recommendation_id"); otherwise (no id, or an id the log does not hold) the
    same user's latest impression showing that item at most `window_s` seconds before the
    event ("window"). Events that match neither are left out: no version showed the item."""
    if window_s < 0:
        raise ValueError(f"window_s: {window_s} (rule: seconds, at least 0)")
    shown = shown_items(impressions)
    cols = ["event_id", "user_id", "item_id", "type", "ts", "recommendation_id"]
    ev = events[cols].copy()
    ev["ts"] = ev["ts"].astype(np.float64)
    by_id = ev.dropna(subset=["recommendation_id"]).merge(
        shown.drop(columns=["user_id", "ts"]), on=["recommendation_id", "item_id"], how="inner")
    by_id["matched_by"] = "recommendation_id"
    rest = ev[~ev["event_id"].isin(by_id["event_id"])]
    frames = [by_id]
    if len(rest) and len(shown):
        left = rest.drop(columns="recommendation_id").sort_values("ts", kind="stable")
        right = shown.rename(columns={"ts": "shown_ts"}).sort_values("shown_ts", kind="stable")
        by_window = pd.merge_asof(left, right, left_on="ts", right_on="shown_ts", by=["user_id", "item_id"],
                                  direction="backward", tolerance=float(window_s))  # fmt: skip
        by_window = by_window.dropna(subset=["recommendation_id"]).drop(columns="shown_ts")
        by_window["matched_by"] = "window"
        frames.append(by_window)
    out = pd.concat([f[ATTRIBUTED_COLUMNS] for f in frames], ignore_index=True)
    return out.astype({"position": np.int64}).sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def per_impression(impressions: pd.DataFrame, attributed: pd.DataFrame, k: int) -> pd.DataFrame:
    """One row per impression: recommendation_id, user_id, model_version, variant, clicked
    (1 if an item at position <= k was clicked), purchased (1 if a shown item was bought),
    rr (1 / position of the first clicked item at position <= k; 0 if none)."""
    if k < 1:
        raise ValueError(f"k: {k} (rule: at least 1)")
    imp = impressions[["recommendation_id", "user_id", "model_version", "variant"]].drop_duplicates("recommendation_id")
    clicks = attributed[attributed["type"].isin(CLICK_TYPES) & (attributed["position"] <= k)]
    first = clicks.groupby("recommendation_id")["position"].min()
    bought = attributed.loc[attributed["type"].isin(PURCHASE_TYPES), "recommendation_id"].unique()
    out = imp.copy()
    position = out["recommendation_id"].map(first)
    out["clicked"] = position.notna().astype(np.int64)
    out["rr"] = (1.0 / position).fillna(0.0)
    out["purchased"] = out["recommendation_id"].isin(bought).astype(np.int64)
    return out.reset_index(drop=True)


def per_variant(impressions: pd.DataFrame, attributed: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per (model_version, variant): users, impressions, clicks and purchases (events), the
    clicked and purchased impressions, CTR@k, conversion, MRR (of the first clicked item)."""
    rows = per_impression(impressions, attributed, k)
    events = attributed.groupby(["model_version", "variant"])["type"].value_counts().unstack(fill_value=0)
    grouped = rows.groupby(["model_version", "variant"])
    out = pd.DataFrame({
        "users": grouped["user_id"].nunique(), "impressions": grouped.size(),
        "clicked_impressions": grouped["clicked"].sum(), "purchased_impressions": grouped["purchased"].sum(),
        "ctr": grouped["clicked"].mean(), "conversion": grouped["purchased"].mean(), "mrr": grouped["rr"].mean(),
    })  # fmt: skip
    for name, types in (("clicks", CLICK_TYPES), ("purchases", PURCHASE_TYPES)):
        present = [t for t in types if t in events.columns]
        counts = events[present].sum(axis=1) if present else pd.Series(0, index=events.index)
        out[name] = counts.reindex(out.index, fill_value=0).astype(np.int64)
    return out.reset_index()


@dataclass(frozen=True)
class RatioStats:
    """A ratio metric over users: sum of values / number of impressions, with the delta
    method's variance of the ratio and the per-user variance that sizes a test."""

    users: int
    impressions: int
    mean: float
    variance: float  # of the mean
    unit_variance: float  # variance per user: variance * users


def ratio_stats(values: np.ndarray, user_ids: np.ndarray) -> RatioStats:
    """`values` per impression (0/1 or a reciprocal rank), `user_ids` per impression."""
    frame = pd.DataFrame({"u": user_ids, "y": np.asarray(values, dtype=np.float64)})
    per_user = frame.groupby("u")["y"].agg(["sum", "size"])
    n_users, n_imp = len(per_user), int(per_user["size"].sum())
    if n_users == 0:
        return RatioStats(0, 0, math.nan, math.nan, math.nan)
    y, n = per_user["sum"].to_numpy(), per_user["size"].to_numpy(dtype=np.float64)
    mean = float(y.sum() / n.sum())
    # Var(sum y / sum n) ~ Var(y_u - mean * n_u) / (U * mean(n)^2), per user u (delta method)
    resid = y - mean * n
    unit = float(np.var(resid, ddof=1) / n.mean() ** 2) if n_users > 1 else math.nan
    return RatioStats(n_users, n_imp, mean, unit / n_users, unit)


def min_users(unit_variance: float, baseline: float, min_effect: float, alpha: float, power: float) -> int | None:
    """Users per arm needed to detect a relative change of `min_effect` from `baseline` with a
    two-sided test at `alpha` and the given power: (z_{1-alpha/2} + z_{power})^2 * 2 s^2 / d^2,
    d = min_effect * baseline, s^2 the per-user variance (the champion's, for both arms). None
    when it cannot be computed yet (no variance, or a baseline of 0: nothing to be relative to)."""
    for name, value, lo, hi in (("min_effect", min_effect, 0, math.inf), ("alpha", alpha, 0, 1), ("power", power, 0, 1)):
        if not lo < value < hi:
            raise ValueError(f"{name}: {value} (rule: between {lo} and {hi}, exclusive)")
    delta = min_effect * baseline
    if not (math.isfinite(unit_variance) and math.isfinite(delta)) or delta <= 0 or unit_variance <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return math.ceil(z * z * 2 * unit_variance / (delta * delta))


@dataclass(frozen=True)
class Comparison:
    """One metric, challenger minus champion."""

    metric: str
    champion: float
    challenger: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    users: tuple[int, int]  # champion, challenger
    min_users: int | None  # per arm
    verdict: str  # not enough data to decide | challenger better | challenger worse | no difference detected

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(rows: pd.DataFrame, champion: str, challenger: str, *, min_effect: float, alpha: float, power: float,
            variant_col: str = "model_version") -> list[Comparison]:  # fmt: skip
    """Each metric of `challenger` against `champion` (values of `variant_col` in the
    per-impression `rows`): the difference with its (1 - alpha) CI (CI_METHOD), a two-sided
    p-value, and the verdict. A winner (or loser) is called only when both arms have at least
    the minimum sample and the CI excludes 0; before that: 'not enough data to decide'."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    a = rows[rows[variant_col] == champion]
    b = rows[rows[variant_col] == challenger]
    out = []
    for metric, column in (("ctr", "clicked"), ("conversion", "purchased"), ("mrr", "rr")):
        sa = ratio_stats(a[column].to_numpy(), a["user_id"].to_numpy())
        sb = ratio_stats(b[column].to_numpy(), b["user_id"].to_numpy())
        diff = sb.mean - sa.mean
        se = math.sqrt(sa.variance + sb.variance) if sa.users > 1 and sb.users > 1 else math.nan
        low, high = (diff - z * se, diff + z * se) if se > 0 else (math.nan, math.nan)
        p = 2 * (1 - NormalDist().cdf(abs(diff) / se)) if se > 0 else math.nan
        needed = min_users(sa.unit_variance, sa.mean, min_effect, alpha, power)
        enough = needed is not None and min(sa.users, sb.users) >= needed and math.isfinite(low)
        if not enough:
            verdict = "not enough data to decide"
        elif low > 0:
            verdict = "challenger better"
        elif high < 0:
            verdict = "challenger worse"
        else:
            verdict = "no difference detected"
        out.append(Comparison(metric, sa.mean, sb.mean, diff, low, high, p, (sa.users, sb.users), needed, verdict))
    return out
