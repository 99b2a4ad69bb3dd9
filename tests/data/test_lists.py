"""List cells as CSV files hold them (issue 16 item 4, issue 14 item 7): every accepted form, and the refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.features import read_table
from supermoe_rec.data.lists import ListParseError, parse_list
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import load_data


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("1 2 3", ["1", "2", "3"]),  # ids joined by the separator
        ("  ", []),
        ("[]", []),  # pandas' repr of an empty list or array
        ("[1 2 3]", ["1", "2", "3"]),  # numpy int array repr
        ("[1. 2. 3.]", ["1.", "2.", "3."]),  # numpy float array repr
        ("[ 10  200\n 3000]", ["10", "200", "3000"]),  # numpy wraps long arrays over lines
        ("['Comedy' 'Romance']", ["Comedy", "Romance"]),  # numpy string array repr
        ("['Comedy', 'Romance']", ["Comedy", "Romance"]),  # Python list repr
        ("['Film-Noir' \"Children's\"]", ["Film-Noir", "Children's"]),  # a quote inside a quoted value
        ("['a b' 'c']", ["a b", "c"]),  # a space inside a quoted value
        ('["Comedy", "Romance"]', ["Comedy", "Romance"]),  # JSON
        ("[1, 2, 3]", [1, 2, 3]),  # JSON numbers
    ],
)
def test_accepted_forms(text: str, items: list[object]) -> None:
    assert parse_list(text, " ") == items


def test_other_separator() -> None:
    assert parse_list("a|b| c", "|") == ["a", "b", "c"]
    assert parse_list("[1 2]", "|") == ["1", "2"]  # a bracketed list is parsed whatever the separator


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1 2", "does not close it"),
        ("[1 2 ... 9 10]", "cut short"),
        ("[[1, 2], [3]]", "nested list"),
        ("a] b", "carries a bracket or quote"),
        ("'a' 'b'", "carries a bracket or quote"),  # quoted tokens outside brackets are not a known form
    ],
)
def test_refused_forms(text: str, message: str) -> None:
    with pytest.raises(ListParseError, match=message):
        parse_list(text, " ")


def _schema(hash_genres: bool) -> Schema:
    genre = {"name": "genre", "num_embeddings": 50, "hash": True} if hash_genres else {"name": "genre", "vocab": True}
    return Schema.from_dict(
        {
            "user_column": "u",
            "group_column": "g",
            "tables": [{"name": "item", "num_embeddings": 100}, genre],
            "sparse_features": [{"name": "genres", "column": "genres", "table": "genre", "multi_valued": True}],
            "sequence_features": [
                {"name": "history", "column": "history", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "item", "column": "item", "table": "item"},
            ],
            "tasks": [{"name": "click", "type": "binary", "label": "y"}],
        }
    )


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "u": [1, 1, 2],
            "g": [0, 0, 1],
            "item": [5, 6, 7],
            "history": [[3, 4], [3, 4], []],
            "genres": [["Comedy", "Romance"], [], ["Drama"]],
            "y": [1, 0, 1],
        }
    )


@pytest.mark.parametrize("hash_genres", [True, False])
def test_pandas_to_csv_round_trip(tmp_path: Path, hash_genres: bool) -> None:
    """``DataFrame.to_csv`` writes lists as "['Comedy', 'Romance']" and "[]": they read back as the same ids."""
    frame = _frame()
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    assert "\"['Comedy', 'Romance']\"" in path.read_text()
    numpy_frame = frame.assign(genres=[np.array(g, dtype=str) for g in frame["genres"]])
    numpy_frame.to_csv(tmp_path / "n.csv", index=False)  # numpy arrays: "['Comedy' 'Romance']"
    assert "['Comedy' 'Romance']" in (tmp_path / "n.csv").read_text()
    schema = _schema(hash_genres)
    expected = TabularDataset(frame, schema, "frame")
    for csv in (path, tmp_path / "n.csv"):
        ds = TabularDataset(read_table(csv), schema, str(csv))
        for name in ("history", "genres", "item"):
            np.testing.assert_array_equal(ds.features[name].values, expected.features[name].values)
            np.testing.assert_array_equal(ds.features[name].offsets, expected.features[name].offsets)


def test_junk_is_never_hashed() -> None:
    """A list the parser cannot read is an error naming the row, not a hashed token like "['Comedy'"."""
    frame = _frame().astype({"genres": object})
    frame.loc[2, "genres"] = "['Comedy' 'Drama'"  # cut off
    with pytest.raises(DataError, match=r"row 2, column 'genres': .* does not close it"):
        TabularDataset(frame, _schema(True), "t")
    frame.loc[2, "genres"] = "Comedy|'Drama'"  # a separator the schema does not declare, with quotes
    with pytest.raises(DataError, match=r"row 2, column 'genres': token .* carries a bracket or quote"):
        TabularDataset(frame, _schema(True), "t")


def test_list_text_in_scalar_feature() -> None:
    """A scalar feature reading a list written as text says to set multi_valued (it would be hashed as one id)."""
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "tables": [{"name": "genre", "num_embeddings": 50, "hash": True}],
            "sparse_features": [{"name": "genres", "column": "genres", "table": "genre"}],
            "tasks": [{"name": "click", "type": "binary", "label": "y"}],
        }
    )
    frame = pd.DataFrame({"u": [1, 2], "genres": ["Drama", "['Comedy' 'Drama']"], "y": [1, 0]})
    with pytest.raises(DataError, match=r"row 1, column 'genres': holds a list written as text .* multi_valued: true"):
        TabularDataset(frame, schema, "t")


def test_csv_lists_of_at_most_one_item(tmp_path: Path) -> None:
    """Issue 14 item 7: when no list holds two items, pandas reads the column as numbers (2555.0, NaN)."""
    frame = pd.DataFrame(
        {
            "u": [1, 1, 2, 3],
            "g": [0, 0, 1, 2],
            "item": [5, 6, 7, 8],
            "history": ["4", "4", "", "9"],
            "genres": ["Drama", "Drama", "", "Comedy"],
            "y": [1, 0, 1, 0],
        }
    )
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    table = read_table(path)
    assert table["history"].dtype == np.float64  # what pandas makes of it
    ds = TabularDataset(table, _schema(False), str(path))
    assert ds.features["history"].values.tolist() == [4, 4, 9]
    assert np.diff(ds.features["history"].offsets).tolist() == [1, 1, 0, 1]
    assert ds.report.vocab_oov == {"genres": 0}
    # messages print plain values, not np.float64(2.5)
    table.loc[3, "history"] = 2.5
    with pytest.raises(DataError, match=r"row 3, column 'history': id 2.5 is not an integer") as info:
        TabularDataset(table, _schema(False), str(path))
    assert "np.float64" not in str(info.value)


def test_csv_valid_parquet_train_agree(tmp_path: Path) -> None:
    """A vocab table keys values by their text: ids from a parquet train file and a CSV valid file agree."""
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(
        """
user_column: u
group_column: g
tables: [{name: item, vocab: true}, {name: genre, vocab: true}]
sparse_features: [{name: genres, column: genres, table: genre, multi_valued: true}]
sequence_features:
  - {name: history, column: history, table: item, multi_valued: true, per_group: true}
  - {name: item, column: item, table: item}
tasks: [{name: click, type: binary, label: y}]
"""
    )
    frame = _frame()
    frame.to_parquet(tmp_path / "train.parquet")
    frame.to_csv(tmp_path / "valid.csv", index=False)
    data = load_data(
        DataConfig(
            source="table",
            schema=str(schema_path),
            table=str(tmp_path / "train.parquet"),
            valid_table=str(tmp_path / "valid.csv"),
        )
    )
    train, valid = data.splits["train"], data.splits["valid"]
    for name in ("history", "item", "genres"):
        np.testing.assert_array_equal(train.features[name].values, valid.features[name].values)
    assert valid.report.vocab_oov == {"genres": 0, "history": 0, "item": 0}


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("p", np.inf, "dense value is not a finite number: inf"),
        ("m", 0.5, "task mask must be 0 or 1, got 0.5"),
        ("i", 2.5, "id 2.5 is not an integer"),
    ],
)
def test_messages_print_plain_values(column: str, value: float, message: str) -> None:
    """Issue 14 item 7: numpy scalars print as the values they hold, not np.float64(...)."""
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "tables": [{"name": "i", "num_embeddings": 10}],
            "sparse_features": [{"name": "i", "column": "i", "table": "i"}],
            "dense_features": [{"name": "p", "column": "p"}],
            "tasks": [{"name": "y", "type": "binary", "label": "y", "mask": "m"}],
        }
    )
    frame = pd.DataFrame({"u": [1, 2], "i": [1.0, 2.0], "p": [1.0, 2.0], "y": [1, 0], "m": [1.0, 1.0]})
    frame.loc[1, column] = value
    with pytest.raises(DataError, match=rf"row 1, column '{column}': {re.escape(message)}"):
        TabularDataset(frame, schema, "t")
