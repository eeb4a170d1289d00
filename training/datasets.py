"""Datasets: the seeded synthetic generator (the default), MovieLens and generic interaction
files. Every loader returns the same `Dataset`; bad data raises `DataError` naming the file,
the column and the rule that failed.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from models.core.interactions import InteractionLog, ItemCatalog, build_log
from models.serving.event_log import read_event_log
from models.serving.events import EVENT_TYPES as SERVED_EVENT_TYPES

MOVIELENS_RATINGS = "ratings.csv"
MOVIELENS_MOVIES = "movies.csv"
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


class DataError(ValueError):
    """Input data that cannot be trained on; the message names file, column and rule."""


@dataclass(frozen=True)
class Dataset:
    name: str
    log: InteractionLog
    catalog: ItemCatalog
    content_hash: str
    source: dict[str, Any] = field(default_factory=dict)


def _content_hash(frame: pd.DataFrame, items: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for part in (frame, items):
        digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def _finish(name: str, frame: pd.DataFrame, items: pd.DataFrame, where: str, source: dict[str, Any]) -> Dataset:
    """frame: user_id, item_id, ts, rating; items: item_id, title, genres, year."""
    if frame.empty:
        raise DataError(f"{where}: no interactions left after parsing (rule: at least one row)")
    # Items seen in interactions but absent from the item file get unknown attributes.
    missing = pd.Index(frame["item_id"].unique()).difference(items["item_id"])
    if len(missing):
        extra = pd.DataFrame({"item_id": missing, "title": missing, "genres": "", "year": -1.0})
        items = pd.concat([items, extra], ignore_index=True)
    items = items.drop_duplicates("item_id").sort_values("item_id", kind="stable")
    items = items.reset_index(drop=True)
    catalog = ItemCatalog(
        item_ids=items["item_id"].to_numpy(dtype=str),
        titles=items["title"].to_numpy(dtype=str),
        genres=items["genres"].to_numpy(dtype=str),
        years=items["year"].to_numpy(dtype=np.float32),
    )
    log = build_log(frame, catalog.item_ids)
    return Dataset(name, log, catalog, _content_hash(frame, items), source)


# -- synthetic ---------------------------------------------------------------------------

# A timeline stays in its topic with probability STAY at each step; a jump goes to one of the
# user's FAVOURITES topics, or with probability EXPLORE to any topic by its popularity.
STAY = 0.75
EXPLORE = 0.3
FAVOURITES = 3

GENRES = (
    "Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Horror", "Musical", "Romance", "Sci-Fi", "Thriller", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class _SyntheticCatalog:
    """The item side of the synthetic world, shared by every user block."""

    n_topics: int
    item_topic: np.ndarray
    item_weight: np.ndarray
    years: np.ndarray
    genres: list[str]

    def items_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "item_id": [f"i{i}" for i in range(len(self.years))],
                "title": [f"Item {i} ({int(y)})" for i, y in enumerate(self.years)],
                "genres": self.genres,
                "year": self.years,
            }
        )


def _synthetic_catalog(rng: np.random.Generator, n_items: int, n_topics: int) -> _SyntheticCatalog:
    topic_genres = [rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False) for _ in range(n_topics)]
    item_topic = rng.integers(0, n_topics, n_items)
    item_weight = 1.0 / np.arange(1, n_items + 1) ** 0.9  # power-law popularity
    item_weight = item_weight[rng.permutation(n_items)]
    years = rng.integers(1960, 2025, n_items).astype(np.float32)
    genres = []
    for i in range(n_items):
        g = set(topic_genres[item_topic[i]].tolist())
        if rng.random() < 0.3:
            g.add(int(rng.integers(len(GENRES))))
        genres.append("|".join(GENRES[j] for j in sorted(g)))
    return _SyntheticCatalog(n_topics, item_topic, item_weight, years, genres)


@dataclass(frozen=True)
class SyntheticTaste:
    """What the generator knows and a model has to infer, for a ceiling (bench.quality's
    oracle) and for tests, never for training: each user's favourite topics and their
    weights, and every topic's overall popularity (the draw of an exploring jump)."""

    topic_pop: np.ndarray  # (n_topics,)
    favourites: np.ndarray  # (n_users, FAVOURITES) topic numbers, row = generator user number
    fav_weights: np.ndarray  # (n_users, FAVOURITES), rows sum to 1


@dataclass(frozen=True)
class SyntheticWorld:
    """The generator's truth behind one `synthetic()` data set."""

    item_topic: np.ndarray  # by generator item number (the N of item id i<N>)
    item_weight: np.ndarray  # popularity within and across topics
    taste: SyntheticTaste


def _synthetic_users(
    rng: np.random.Generator, cat: _SyntheticCatalog, first_user: int, n_users: int, n_interactions: int,
    topic_pop: np.ndarray | None = None,
) -> tuple[pd.DataFrame, SyntheticTaste]:
    """Timelines of users first_user .. first_user + n_users - 1 (ids u<N>), and their taste."""
    n_topics, n_items = cat.n_topics, len(cat.years)
    # Interactions per user: heavy-tailed activity, at least 5 each.
    activity = rng.lognormal(0.0, 1.0, n_users)
    per_user = np.maximum(5, np.round(activity / activity.sum() * n_interactions)).astype(np.int64)
    user = np.repeat(np.arange(n_users), per_user)
    n = len(user)
    first = np.concatenate(([True], user[1:] != user[:-1]))

    # Each user's favourite topics with Dirichlet weights; a jump picks one of them, or,
    # with probability EXPLORE, any topic by its overall popularity (exploration).
    if topic_pop is None:
        topic_pop = rng.dirichlet(np.full(n_topics, 0.5))
    favourites = rng.choice(n_topics, size=(n_users, FAVOURITES), p=topic_pop)
    fav_weights = rng.dirichlet(np.ones(FAVOURITES), n_users)
    jump = first | (rng.random(n) > STAY)
    u = rng.random(n)
    choice = (u[:, None] > np.cumsum(fav_weights[user], axis=1)).sum(axis=1).clip(0, FAVOURITES - 1)
    jump_topic = favourites[user, choice]
    explore = rng.random(n) < EXPLORE
    jump_topic[explore] = rng.choice(n_topics, size=int(explore.sum()), p=topic_pop)
    last_jump = np.maximum.accumulate(np.where(jump, np.arange(n), 0))
    topic = jump_topic[last_jump]

    # Within a topic, items are drawn by popularity: one global search over per-topic CDFs.
    by_topic = np.lexsort((np.arange(n_items), cat.item_topic))
    sorted_topic = cat.item_topic[by_topic]
    w = cat.item_weight[by_topic]
    topic_total = np.bincount(sorted_topic, weights=w, minlength=n_topics)
    within = np.cumsum(w) - np.concatenate(([0], np.cumsum(topic_total)))[sorted_topic]
    cdf = sorted_topic + within / np.maximum(topic_total[sorted_topic], 1e-12)
    draw = topic + rng.random(n) * 0.999999
    item = by_topic[np.minimum(np.searchsorted(cdf, draw), n_items - 1)]
    empty_topic = topic_total[topic] == 0
    item[empty_topic] = rng.integers(0, n_items, int(empty_topic.sum()))

    start = rng.integers(1_500_000_000, 1_520_000_000, n_users)
    gaps = rng.exponential(3600 * 24, n).astype(np.int64) + 1
    gaps[first] = 0
    ts = start[user] + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], per_user)
    rating = np.clip(np.round(rng.normal(3.6, 0.9, n) * 2) / 2, 0.5, 5.0).astype(np.float32)

    # The first interaction of each (user, item) pair, found on the integer ids (rows are in
    # time order per user), before any id becomes a string.
    key = (user + first_user).astype(np.int64) * n_items + item
    _, first_row = np.unique(key, return_index=True)
    keep = np.sort(first_row)
    frame = pd.DataFrame(
        {
            "user_id": _prefixed_ids("u", user[keep] + first_user),
            "item_id": _prefixed_ids("i", item[keep]),
            "ts": ts[keep],
            "rating": rating[keep],
        }
    )
    return frame, SyntheticTaste(topic_pop, favourites, fav_weights)


def _prefixed_ids(prefix: str, numbers: np.ndarray) -> pd.Series:
    """`prefix` + each number, as an Arrow-backed string column (one vectorised Arrow
    call, no Python string per row)."""
    text = pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")
    return text.to_pandas()  # pandas' own (Arrow-backed) str dtype


def synthetic(
    n_users: int = 3000,
    n_items: int = 2000,
    n_interactions: int = 150_000,
    n_topics: int = 40,
    seed: int = 7,
) -> Dataset:
    """Seeded users, items and timelines with a ranker-learnable structure.

    Items belong to topics (each topic has its genres) and have a power-law popularity. A user
    has a few favourite topics; a timeline stays in its current topic with probability STAY
    and otherwise jumps to one of the user's topics, so consecutive items co-occur, genres
    predict taste and popularity matters. Fully vectorised: millions of rows take seconds.
    """
    return synthetic_world(n_users, n_items, n_interactions, n_topics, seed)[0]


def synthetic_world(
    n_users: int = 3000, n_items: int = 2000, n_interactions: int = 150_000, n_topics: int = 40, seed: int = 7,
) -> tuple[Dataset, SyntheticWorld]:
    """`synthetic()`'s data set with the truth it was drawn from."""
    if min(n_users, n_items, n_interactions, n_topics) <= 0:
        raise DataError("synthetic: n_users, n_items, n_interactions and n_topics must be > 0")
    rng = np.random.default_rng(seed)
    catalog = _synthetic_catalog(rng, n_items, n_topics)
    frame, taste = _synthetic_users(rng, catalog, 0, n_users, n_interactions)
    params = {"n_users": n_users, "n_items": n_items, "n_interactions": n_interactions,
              "n_topics": n_topics, "seed": seed}  # fmt: skip
    dataset = _finish("synthetic", frame, catalog.items_frame(), "synthetic", params)
    return dataset, SyntheticWorld(catalog.item_topic, catalog.item_weight, taste)


def synthetic_partitions(
    n_users: int, n_items: int, n_interactions: int, n_partitions: int, n_topics: int = 40, seed: int = 7
) -> tuple[pd.DataFrame, Iterator[pd.DataFrame]]:
    """The same world at any size, one block of users at a time: (items, partitions). Each
    partition holds its own users' whole timelines and is generated only when asked for, so
    memory is bounded by one partition, not by the total."""
    if min(n_users, n_items, n_interactions, n_topics, n_partitions) <= 0 or n_partitions > n_users:
        raise DataError("synthetic: sizes must be > 0 and n_partitions <= n_users")
    rng = np.random.default_rng(seed)
    catalog = _synthetic_catalog(rng, n_items, n_topics)
    topic_pop = rng.dirichlet(np.full(n_topics, 0.5))
    bounds = np.linspace(0, n_users, n_partitions + 1).astype(np.int64)

    def parts() -> Iterator[pd.DataFrame]:
        for p in range(n_partitions):
            block = int(bounds[p + 1] - bounds[p])
            part_rng = np.random.default_rng([seed, p])
            yield _synthetic_users(part_rng, catalog, int(bounds[p]), block,
                                   round(n_interactions * block / n_users), topic_pop)[0]  # fmt: skip

    return catalog.items_frame(), parts()


def write_synthetic(out: Path, n_users: int, n_items: int, n_interactions: int, n_partitions: int,
                    seed: int = 7) -> tuple[Path, Path]:  # fmt: skip
    """Write a partitioned synthetic data set: out/interactions/part-NNNNN.parquet and
    out/items.parquet. Returns (interactions folder, items file)."""
    items, parts = synthetic_partitions(n_users, n_items, n_interactions, n_partitions, seed=seed)
    folder = out / "interactions"
    folder.mkdir(parents=True, exist_ok=True)
    for p, part in enumerate(parts):
        part.to_parquet(folder / f"part-{p:05d}.parquet", index=False)
    items.drop(columns=["year"]).to_parquet(out / "items.parquet", index=False)
    return folder, out / "items.parquet"


# -- files -------------------------------------------------------------------------------


# Explicit column types of MovieLens' files, for pyarrow's CSV reader (multi-threaded, no
# type inference): ml-25m's ratings.csv (25M lines) reads in seconds this way.
MOVIELENS_RATING_TYPES: dict[str, pa.DataType] = {
    "userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64(),
}  # fmt: skip
MOVIELENS_MOVIE_TYPES: dict[str, pa.DataType] = {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}


def _read_typed_csv(path: Path, column_types: dict[str, pa.DataType]) -> pd.DataFrame | None:
    """The columns `column_types` of a CSV through pyarrow with those types, or None when the
    file does not fit them (a missing column, a value of another type): the caller then reads
    it the slow way, whose checks name the column, the line and the rule."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=column_types, include_columns=list(column_types)))  # fmt: skip
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        return None
    if any(table.column(name).null_count for name in column_types):
        return None  # empty fields: the slow path locates them
    return table.to_pandas()


def _read_table(path: Path, column_types: dict[str, pa.DataType] | None = None) -> pd.DataFrame:
    if column_types and path.is_file() and path.suffix.lower() in (".csv", ".txt"):
        typed = _read_typed_csv(path, column_types)
        if typed is not None:
            return typed
    if path.is_dir():  # a partitioned Parquet data set (e.g. from `write_synthetic`)
        if not any(path.glob("*.parquet")):
            raise DataError(f"{path}: a folder without .parquet files")
        try:
            return pd.read_parquet(path)
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: cannot be read as a Parquet data set: {err}") from err
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {err}") from err
    raise DataError(f"{path}: unsupported file type {suffix!r}; valid: .csv, .txt, .parquet")


def _position(path: Path, row: int) -> str:
    """Where data row `row` (0-based, as read) is in the file: `line N` of a CSV (its first
    physical line, counting the header, blank lines and quoted line breaks as the reader
    does), `row N` (1-based) of a Parquet file or data set."""
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return f"row {row + 1}"
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        records = -1  # the header is record -1
        previous_end = 0
        try:
            for record in reader:
                # pandas skips empty and whitespace-only lines (skip_blank_lines): so does this count.
                if record and (len(record) > 1 or record[0].strip()):
                    if records == row:
                        return f"line {previous_end + 1}"
                    records += 1
                previous_end = reader.line_num
        except csv.Error:  # a field the csv module refuses (e.g. over its size limit): fall back
            pass
    return f"data row {row + 1}"


def _require(frame: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column {missing[0]!r} (rule: required; columns found: {list(frame.columns)})"
        )


def _ids(frame: pd.DataFrame, path: Path, column: str) -> pd.Series:
    values = frame[column]
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        where = _position(path, row)
        raise DataError(f"{path}: column {column!r} is empty at {where} (rule: ids must be present)")
    if pd.api.types.is_float_dtype(values):
        if not (values == values.round()).all():
            raise DataError(f"{path}: column {column!r} has non-integer numbers (rule: ids are integers or strings)")
        values = values.astype(np.int64)
    return values.astype(str)


def _timestamps(frame: pd.DataFrame, path: Path, column: str) -> np.ndarray:
    values = frame[column]
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.to_numpy(dtype=np.float64).astype(np.int64)
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: column {column!r} value {values.iloc[row]!r} at {_position(path, row)} "
            "is not a timestamp "
            "(rule: epoch seconds or an ISO date)"
        )
    epoch = pd.Timestamp(0, tz="UTC")
    return ((parsed - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _ratings(frame: pd.DataFrame, path: Path, column: str | None) -> np.ndarray:
    if column is None:
        return np.full(len(frame), np.nan, dtype=np.float32)
    numeric = pd.to_numeric(frame[column], errors="coerce")
    bad = numeric.isna() & frame[column].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: column {column!r} value {frame[column].iloc[row]!r} at {_position(path, row)} "
            "is not a number "
            "(rule: ratings are numeric)"
        )
    return numeric.to_numpy(dtype=np.float32)


def _item_file(items_path: str | Path | None, items_id_col: str = "item_id", title_col: str | None = "title",
               genres_col: str | None = "genres", year_col: str | None = None,
               column_types: dict[str, pa.DataType] | None = None) -> pd.DataFrame:  # fmt: skip
    """An item file (id, title, "|"-separated genres, year) as item_id, title, genres, year;
    empty when there is none. `column_types` as in `_read_table`."""
    if items_path is None:
        return pd.DataFrame({"item_id": [], "title": [], "genres": [], "year": []})
    ipath = Path(items_path)
    iraw = _read_table(ipath, column_types)
    _require(iraw, ipath, [items_id_col])
    ids = _ids(iraw, ipath, items_id_col)
    titles = iraw[title_col].astype(str) if title_col and title_col in iraw else ids
    genres = iraw[genres_col].fillna("").astype(str) if genres_col and genres_col in iraw else ""
    if year_col and year_col in iraw:
        years = pd.to_numeric(iraw[year_col], errors="coerce").fillna(-1.0)
    else:
        years = titles.str.extract(_YEAR_IN_TITLE, expand=False).astype(float).fillna(-1.0)
    return pd.DataFrame({"item_id": ids, "title": titles, "genres": genres, "year": years})


def interactions(
    path: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    items_path: str | Path | None = None,
    items_id_col: str = "item_id",
    title_col: str | None = "title",
    genres_col: str | None = "genres",
    year_col: str | None = None,
    name: str = "interactions",
    column_types: dict[str, pa.DataType] | None = None,
    items_column_types: dict[str, pa.DataType] | None = None,
) -> Dataset:
    """A CSV/Parquet of user, item, timestamp (and optional rating) with mapped column names,
    and an optional item file (id, title, "|"-separated genres, year). `column_types` and
    `items_column_types` (CSV only) read those columns with pyarrow at those types."""
    path = Path(path)
    raw = _read_table(path, column_types)
    _require(raw, path, [user_col, item_col, time_col] + ([rating_col] if rating_col else []))
    frame = pd.DataFrame(
        {
            "user_id": _ids(raw, path, user_col),
            "item_id": _ids(raw, path, item_col),
            "ts": _timestamps(raw, path, time_col),
            "rating": _ratings(raw, path, rating_col),
        }
    )
    items = _item_file(items_path, items_id_col, title_col, genres_col, year_col, items_column_types)
    source = {"path": str(path), "items_path": str(items_path) if items_path else None}
    return _finish(name, frame, items, str(path), source)


def movielens(directory: str | Path) -> Dataset:
    """The ml-latest-small / ml-25m layout: ratings.csv and movies.csv; every rating counts
    as an interaction, and the year comes from the title."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (rule: give the folder with {MOVIELENS_RATINGS})")
    return interactions(
        directory / MOVIELENS_RATINGS,
        user_col="userId",
        item_col="movieId",
        time_col="timestamp",
        rating_col="rating",
        items_path=directory / MOVIELENS_MOVIES,
        items_id_col="movieId",
        title_col="title",
        genres_col="genres",
        name="movielens",
        column_types=MOVIELENS_RATING_TYPES,
        items_column_types=MOVIELENS_MOVIE_TYPES,
    )


# -- the service's event log -------------------------------------------------------------

# What the service's POST /events take (models/serving/events.py): every type by default.
EVENT_TYPES: tuple[str, ...] = SERVED_EVENT_TYPES


def _frame_of(dataset: Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A dataset back as its frames: interactions (user_id, item_id, ts, rating) and items."""
    log, cat = dataset.log, dataset.catalog
    frame = pd.DataFrame({"user_id": log.user_ids[log.user], "item_id": cat.item_ids[log.item],
                          "ts": log.ts, "rating": log.rating})  # fmt: skip
    items = pd.DataFrame({"item_id": cat.item_ids, "title": cat.titles, "genres": cat.genres, "year": cat.years})
    return frame, items


def event_interactions(uri: str, types: tuple[str, ...] = EVENT_TYPES) -> pd.DataFrame:
    """The event log (models/serving/event_log.py; a folder or a URL) as interactions:
    user_id, item_id, ts (epoch seconds, int), rating.

    Every event of `types` is an implicit interaction: the user touched the item (the ranker
    learns from which items users touch, not how; it has no weights). Events are joined by
    their external ids, the ones the service's clients send. A (user, item) pair becomes one
    interaction, at its first event's time (when the item entered the user's history), with
    the value of the pair's latest `rating` event as its rating (NaN when none). An event id
    repeated in the log counts once."""
    unknown = sorted(set(types) - set(SERVED_EVENT_TYPES))
    if unknown or not types:
        raise DataError(f"{uri}: event types {list(types)!r} (rule: one or more of {', '.join(SERVED_EVENT_TYPES)})")
    try:
        log = read_event_log(uri)
    except (OSError, ValueError) as err:  # pyarrow: a missing or unreadable folder, bad files
        raise DataError(f"{uri}: cannot be read as an event log: {err}") from err
    log = log[log["type"].isin(types)]
    if log.empty:
        raise DataError(f"{uri}: no events of the types {', '.join(types)} (rule: at least one event)")
    log = log.sort_values(["ts", "event_id"], kind="stable")
    pairs = log.groupby(["user_id", "item_id"], sort=False)
    rated = log[log["type"] == "rating"].groupby(["user_id", "item_id"], sort=False)["value"].last()
    frame = pairs["ts"].min().to_frame("ts").join(rated.rename("rating")).reset_index()
    frame["ts"] = np.floor(frame["ts"].to_numpy(dtype=np.float64)).astype(np.int64)
    frame["rating"] = frame["rating"].astype(np.float32)
    return frame[["user_id", "item_id", "ts", "rating"]]


def with_events(base: Dataset | None, uri: str, types: tuple[str, ...] = EVENT_TYPES,
                items_path: str | Path | None = None, **item_cols: Any) -> Dataset:  # fmt: skip
    """The event log alone (`base` None), or added to a base dataset.

    Alone: the catalog is the items of the events, with the attributes of `items_path` when
    given (an item file as `interactions` reads it: `items_id_col`, `title_col`, ...).
    With a base: its interactions and catalog, plus the events' (user, item) pairs it does not
    have (a pair it has keeps its base row); users and items match by external id. Items new
    to the catalog (sold since the base data was made) join it without attributes (no title,
    genres or year): the model can recommend them from how users touch them."""
    events = event_interactions(uri, types)
    if base is None:
        items = _item_file(items_path, **item_cols)
        source = {"events": uri, "event_types": list(types), "items_path": str(items_path) if items_path else None}
        return _finish("events", events, items, uri, source)
    frame, items = _frame_of(base)
    seen = pd.MultiIndex.from_frame(frame[["user_id", "item_id"]])
    new = events[~pd.MultiIndex.from_frame(events[["user_id", "item_id"]]).isin(seen)]
    source = {"base": base.name, "base_source": base.source, "events": uri, "event_types": list(types),
              "event_pairs": len(events), "event_pairs_added": len(new)}  # fmt: skip
    return _finish(f"{base.name}+events", pd.concat([frame, new], ignore_index=True), items,
                   f"{base.name} + {uri}", source)  # fmt: skip
