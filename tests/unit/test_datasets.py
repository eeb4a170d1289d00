"""Dataset loaders: the synthetic generator, generic files with column mapping, and clear
errors that name the file, the column and the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.datasets import DataError, interactions, movielens, synthetic


def test_synthetic_is_seeded_and_sized() -> None:
    a, b = synthetic(200, 100, 5000, seed=1), synthetic(200, 100, 5000, seed=1)
    c = synthetic(200, 100, 5000, seed=2)
    assert a.content_hash == b.content_hash != c.content_hash
    assert a.log.n_users == 200 and a.catalog.n_items == 100
    assert 0 < len(a.log) <= 5000 + 5 * 200
    # sorted by (user, time)
    order = np.lexsort((a.log.ts, a.log.user))
    assert (order == np.arange(len(a.log))).all()


def test_synthetic_has_a_popularity_skew() -> None:
    counts = np.sort(np.bincount(synthetic(500, 300, 30_000, seed=4).log.item))[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()


def test_synthetic_scales_to_a_million_draws() -> None:
    ds = synthetic(n_users=20_000, n_items=20_000, n_interactions=1_000_000, seed=5)
    assert len(ds.log) > 500_000


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


GOOD = pd.DataFrame(
    {
        "uid": ["a", "a", "a", "b", "b"],
        "iid": [10, 11, 12, 10, 13],
        "when": ["2024-01-01", "2024-01-02", "2024-01-03", "2024-02-01", "2024-02-02T10:00:00"],
        "stars": [5, 4, 3, 2, 1],
    }
)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_generic_file_with_column_mapping(tmp_path: Path, suffix: str) -> None:
    path = _write(GOOD, tmp_path / f"events{suffix}")
    items = _write(
        pd.DataFrame({"id": [10, 11], "name": ["Ten (1999)", "Eleven"], "tags": ["A|B", "B"]}),
        tmp_path / f"items{suffix}",
    )
    ds = interactions(path, user_col="uid", item_col="iid", time_col="when", rating_col="stars",
                      items_path=items, items_id_col="id", title_col="name", genres_col="tags")  # fmt: skip
    assert len(ds.log) == 5 and ds.log.n_users == 2
    assert sorted(ds.catalog.item_ids.tolist()) == ["10", "11", "12", "13"]
    ten = ds.catalog.item_ids.tolist().index("10")
    assert ds.catalog.years[ten] == 1999 and ds.catalog.genres[ten] == "A|B"
    assert ds.catalog.genre_names() == ["A", "B"]
    assert np.nanmax(ds.log.rating) == 5


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (GOOD.drop(columns="when"), {}, r"missing column 'when'.*required"),
        (GOOD.assign(when=["x", "2024-01-02", "y", "z", "w"]), {}, r"column 'when' value 'x' at line 2 is not a timestamp"),
        (GOOD.assign(stars=["5", "great", 3, 2, 1]), {"rating_col": "stars"}, r"column 'stars' value 'great' .* not a number"),
        (GOOD.assign(uid=["a", None, "a", "b", "b"]), {}, r"column 'uid' is empty at line 3"),
        (GOOD.iloc[:0], {}, r"no interactions left"),
    ],
    ids=["missing column", "bad timestamp", "bad rating", "empty id", "empty file"],
)
def test_bad_files_name_file_column_and_rule(
    tmp_path: Path, frame: pd.DataFrame, kwargs: dict[str, str], message: str
) -> None:
    path = _write(frame, tmp_path / "bad.csv")
    with pytest.raises(DataError, match=message) as info:
        interactions(path, user_col="uid", item_col="iid", time_col="when", **kwargs)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("suffix", "where"), [(".csv", "line 4"), (".parquet", "row 3")])
@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("when", "yesterday", "value 'yesterday' at {where} is not a timestamp"),
     ("stars", "great", "value 'great' at {where} is not a number"),
     ("uid", None, "column 'uid' is empty at {where} ")],
    ids=["timestamp", "rating", "id"],
)  # fmt: skip
def test_bad_values_are_located_as_the_file_counts(
    tmp_path: Path, suffix: str, where: str, column: str, value: str | None, message: str
) -> None:
    """Data row 2 is line 4 of a CSV (after the header) and row 3 of a Parquet file."""
    frame = GOOD.assign(stars=GOOD["stars"].astype(str))
    frame.loc[2, column] = value
    path = _write(frame, tmp_path / f"bad{suffix}")
    with pytest.raises(DataError) as info:
        interactions(path, user_col="uid", item_col="iid", time_col="when", rating_col="stars")
    assert message.format(where=where) in str(info.value)


def test_csv_lines_count_blank_lines_and_quoted_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_text('uid,iid,when,note\na,10,2024-01-01,"two\nlines"\n\n   \nb,11,yesterday,x\n')
    with pytest.raises(DataError, match=r"value 'yesterday' at line 6 is not a timestamp"):
        interactions(path, user_col="uid", item_col="iid", time_col="when")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "file not found"),
        ("data.json", "{}", "unsupported file type '.json'"),
        ("broken.parquet", "not parquet", "cannot be read as parquet"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        interactions(path)


def test_movielens_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ratings.csv"):
        movielens(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        movielens(tmp_path / "nope")
