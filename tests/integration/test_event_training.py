"""`python -m training --events PATH`: the service's event log, written by its exporter, as
training data, alone or on top of a base dataset; how events become interactions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.lifecycle.store import open_version
from models.serving.event_log import EventLogExporter
from models.serving.events import EVENT_TYPES, Event
from models.serving.online.base import OnlineLimits
from models.serving.online.sqlite import SqliteState
from tests.helpers import small_synthetic
from tests.integration.test_cli import SMALL, run_cli
from training.__main__ import build_parser, load_dataset
from training.datasets import DataError, Dataset, event_interactions, with_events

LIMITS = OnlineLimits(max_items=200, retention_s=1e9, journal_s=1e9, timeout_s=5.0)
T0 = 1_700_000_000.0
NEW_ITEM = "sold-since-é"


def export(events: list[Event], root: Path, state_path: Path) -> str:
    """Events through the online state and the exporter, as the service writes its log."""
    state = SqliteState(state_path, LIMITS)
    try:
        for start in range(0, len(events), 1000):
            state.write_events(events[start:start + 1000])
        EventLogExporter(state, str(root), batch_size=5000).export()
    finally:
        state.close()
    return str(root)


def events_of(dataset: Dataset, users: slice, user_prefix: str = "") -> list[Event]:
    """A dataset's interactions of some users as the events a front end would send: each a
    view, every third also a click or a purchase later, ratings where the data has them, and
    an item new to the catalog for a few users."""
    log, cat = dataset.log, dataset.catalog
    keep = np.flatnonzero((log.user >= (users.start or 0)) & (log.user < users.stop))
    # The data's time order, within 3 days: the log has a file per day and export round,
    # and a service exports within the day (hundreds of dates made hundreds of files).
    span = max(1.0, float(log.ts.max() - log.ts.min()))
    times = T0 + (log.ts - log.ts.min()) / span * 3 * 86400.0
    out: list[Event] = []
    for n, row in enumerate(keep.tolist()):
        user, item, ts = user_prefix + str(log.user_ids[log.user[row]]), str(cat.item_ids[log.item[row]]), float(times[row])
        out.append(Event(f"v{row}", user, item, "view", ts))
        if n % 3 == 0:
            out.append(Event(f"f{row}", user, item, ("click", "add_to_cart", "purchase")[n % 9 // 3], ts + 60))
        if not np.isnan(log.rating[row]) and n % 2 == 0:
            out.append(Event(f"r{row}", user, item, "rating", ts + 120, float(log.rating[row])))
        if n % 50 == 0:
            out.append(Event(f"n{row}", user, NEW_ITEM, "click", ts + 1))
    return out


@pytest.fixture(scope="module")
def base() -> Dataset:
    return small_synthetic()


def test_events_become_one_interaction_per_user_and_item(tmp_path: Path) -> None:
    """First event's time, the latest rating's value, the types asked for; ids once."""
    evs = [
        Event("a", "u1", "i1", "view", T0 + 10.7), Event("b", "u1", "i1", "purchase", T0 + 5),
        Event("c", "u1", "i1", "rating", T0 + 20, 4.0), Event("d", "u1", "i1", "rating", T0 + 30, 2.5),
        Event("e", "u2", "i1", "click", T0, 99.0), Event("f", "u2", "i2", "view", T0 + 1),
    ]  # fmt: skip
    uri = export(evs, tmp_path / "log", tmp_path / "s.sqlite3")
    # The same ids again from a second store (a retry after the first one's journal expired).
    export(evs[:2], tmp_path / "log", tmp_path / "other.sqlite3")
    got = event_interactions(uri).sort_values(["user_id", "item_id"]).reset_index(drop=True)
    assert got[["user_id", "item_id"]].to_numpy().tolist() == [["u1", "i1"], ["u2", "i1"], ["u2", "i2"]]
    assert got["ts"].tolist() == [int(T0) + 5, int(T0), int(T0) + 1]
    assert got["rating"].iloc[0] == 2.5 and got["rating"].iloc[1:].isna().all()  # a click's value is no rating
    views = event_interactions(uri, ("view",))
    assert sorted(zip(views["user_id"], views["item_id"], strict=True)) == [("u1", "i1"), ("u2", "i2")]


@pytest.mark.parametrize(
    ("types", "words"), [(("like",), "one or more of view"), (("add_to_cart",), "no events of the types")]
)
def test_unusable_event_data_names_the_log_and_the_rule(tmp_path: Path, types: tuple[str, ...], words: str) -> None:
    uri = export([Event("a", "u1", "i1", "view", T0)], tmp_path / "log", tmp_path / "s.sqlite3")
    with pytest.raises(DataError, match=words) as err:
        event_interactions(uri, types)
    assert uri in str(err.value)


def test_events_on_top_of_a_base_dataset_join_by_id(base: Dataset, tmp_path: Path) -> None:
    """Base users gain the events' new pairs; a pair the base has keeps its base row; users
    and items new to the base join (a new item without attributes)."""
    evs = events_of(base, slice(0, 40))
    evs += [Event("x1", "only-online", str(base.catalog.item_ids[0]), "view", T0),
            Event("x2", str(base.log.user_ids[1]), NEW_ITEM, "purchase", T0)]  # fmt: skip
    uri = export(evs, tmp_path / "log", tmp_path / "s.sqlite3")
    merged = with_events(base, uri)
    assert merged.name == "synthetic+events" and merged.source["base"] == "synthetic"
    base_pairs = set(zip(base.log.user_ids[base.log.user], base.catalog.item_ids[base.log.item], strict=True))
    expected = {(e.user_id, e.item_id) for e in evs} - base_pairs
    assert expected >= {("only-online", str(base.catalog.item_ids[0])), (str(base.log.user_ids[1]), NEW_ITEM)}
    assert {i for _, i in expected} <= {NEW_ITEM, str(base.catalog.item_ids[0])}  # the rest the base has
    assert merged.source["event_pairs_added"] == len(expected)
    assert len(merged.log) == len(base.log) + len(expected)
    assert set(merged.log.user_ids) == set(base.log.user_ids) | {"only-online"}
    new = int(np.flatnonzero(merged.catalog.item_ids == NEW_ITEM)[0])
    assert merged.catalog.genres[new] == "" and merged.catalog.years[new] == -1
    # Base rows unchanged: the same ratings per (user, item) as before.
    def ratings(d: Dataset) -> pd.Series:
        return pd.Series(d.log.rating, index=pd.MultiIndex.from_arrays([d.log.user_ids[d.log.user],
                                                                       d.catalog.item_ids[d.log.item]]))  # fmt: skip
    before, after = ratings(base), ratings(merged)
    pd.testing.assert_series_equal(after.loc[before.index].sort_index(), before.sort_index(), check_names=False)


@pytest.mark.parametrize("retrain", [False, True], ids=["train", "retrain"])
def test_the_cli_reads_events_alone_or_on_top_of_a_dataset(base: Dataset, tmp_path: Path, retrain: bool) -> None:
    uri = export(events_of(base, slice(0, 30)), tmp_path / "log", tmp_path / "s.sqlite3")
    parser = build_parser(retrain)
    alone = load_dataset(parser.parse_args(["--events", uri]))
    on_top = load_dataset(parser.parse_args(["--dataset", "synthetic", *SMALL[:6], "--events", uri,
                                             "--event-types", "purchase,rating"]))  # fmt: skip
    assert alone.name == "events" and set(alone.log.user_ids) == set(base.log.user_ids[:30])
    assert on_top.name == "synthetic+events" and on_top.source["event_types"] == ["purchase", "rating"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--events", uri, "--event-types", "view,like"])


def test_training_on_the_event_log_alone_saves_a_version_that_says_so(base: Dataset, bentoml_home: Path,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """The whole path of the closed loop: the service's events, exported, trained on with the
    item file for the attributes, and the version's metadata names the log."""
    uri = export(events_of(base, slice(0, base.log.n_users)), tmp_path / "log", tmp_path / "s.sqlite3")
    items = tmp_path / "items.parquet"
    cat = base.catalog
    pd.DataFrame({"item_id": cat.item_ids, "title": cat.titles, "genres": cat.genres, "year": cat.years}).to_parquet(items)
    out = run_cli(["--events", uri, "--items", str(items), "--year-col", "year", "--tune-budget", "0",
                   "--model-name", "recsys-events", "--json"], bentoml_home)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    dataset = open_version(result["tag"]).metadata["dataset"]
    assert dataset["name"] == "events" and dataset["source"]["events"] == uri
    assert dataset["n_users"] == base.log.n_users and dataset["n_items"] == cat.n_items + 1  # NEW_ITEM
    assert result["metrics"]["model"]["ndcg"] > result["metrics"]["baseline_popularity"]["ndcg"]
    assert set(EVENT_TYPES) >= set(dataset["source"]["event_types"])


def test_retraining_on_events_on_top_of_a_base_dataset(tmp_path: Path, bentoml_home: Path) -> None:
    """`retrain --events` (the closed loop's step): users the base never had, known by their
    events alone, join the base data; the version's metadata counts them."""
    other = small_synthetic(seed=11)  # the same item ids (i0...), other users' timelines
    uri = export(events_of(other, slice(0, 200), user_prefix="online-"), tmp_path / "log", tmp_path / "s.sqlite3")
    out = run_cli(["retrain", "--dataset", "synthetic", *SMALL, "--events", uri, "--model-name", "recsys-events-top",
                   "--json"], bentoml_home)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    dataset = open_version(result["tag"]).metadata["dataset"]
    assert dataset["name"] == "synthetic+events" and dataset["source"]["base_source"]["n_users"] == 600
    assert dataset["n_users"] == 600 + 200 and dataset["source"]["event_pairs_added"] > 0
    assert result["decision"] is not None
