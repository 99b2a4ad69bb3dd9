"""Every bad-input case is a DataError naming the file, the row and the column; nothing is dropped silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.features import read_table
from supermoe_rec.data.schema import Schema

from .test_byo import SCHEMA, shop_frame


def load(frame: pd.DataFrame) -> TabularDataset:
    return TabularDataset(frame, Schema.from_yaml(SCHEMA), "shop.csv")


def with_value(column: str, row: int, value: object) -> pd.DataFrame:
    frame = shop_frame()
    frame[column] = frame[column].astype(object)
    frame.at[row, column] = value
    return frame


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (shop_frame().drop(columns=["price"]), r"shop.csv: column 'price': missing column"),
        (with_value("price", 3, "abc"), r"shop.csv: row 3, column 'price': dense value is not a finite number: 'abc'"),
        (with_value("item_id", 2, "x13"), r"shop.csv: row 2, column 'item_id': id 'x13' is not an integer"),
        (with_value("item_id", 4, -1), r"shop.csv: row 4, column 'item_id': negative id -1"),
        (with_value("item_id", 1, 5000), r"row 1, column 'item_id': id 5000 is outside table 'item' of 5000 rows"),
        (with_value("categories", 3, [4, -5]), r"row 3, column 'categories': negative id -5"),
        (with_value("user_id", 0, None), r"row 0, column 'user_id': missing id"),
        (with_value("item_id", 0, [1, 2]), r"row 0, column 'item_id': holds a list; set multi_valued: true"),
        # A number is a list of one id (issue 14 item 7: pandas reads such columns as numbers); a bool is not.
        (with_value("categories", 2, True), r"row 2, column 'categories': expected a list of ids, got True"),
        (with_value("clicked", 1, "yes"), r"row 1, column 'clicked': label is not a number: 'yes'"),
        (with_value("clicked", 1, 2), r"row 1, column 'clicked': binary label must be 0 or 1, got 2.0"),
        (
            with_value("purchased", 1, np.nan),
            r"row 1, column 'purchased': label is NaN but mask column 'purchase_known' says task 'purchase'",
        ),
        (with_value("purchase_known", 0, 0.5), r"row 0, column 'purchase_known': task mask must be 0 or 1"),
        (with_value("history", 2, [10, 99]), r"row 2, column 'history': per-group feature 'history' differs"),
    ],
)
def test_bad_values(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load(frame)


def test_rows_after_regrouping_are_reported_in_input_terms() -> None:
    # Row numbers in errors are positions in the table as read (before grouping reorders rows).
    frame = with_value("item_id", 3, -2)
    with pytest.raises(DataError, match=r"row \d, column 'item_id': negative id -2"):
        load(frame)


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: empty file"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("user_id,item_id\n")
    with pytest.raises(DataError, match=r"header.csv: no rows"):
        read_table(tmp_path / "header.csv")
    with pytest.raises(DataError, match=r"missing.csv: file not found"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"shop.csv: no rows"):
        load(shop_frame().iloc[:0])


def test_unlabelled_rows_dropped_and_counted() -> None:
    frame = shop_frame()
    frame.loc[4, ["clicked", "dwell_seconds"]] = np.nan  # row 4 now carries no label at all
    ds = load(frame)
    assert len(ds) == 4
    assert ds.report.rows_dropped_unlabelled == 1
    assert ds.report.rows_read == 5


def test_empty_histories_are_valid() -> None:
    frame = shop_frame()
    frame["history"] = [[], [], [], [], []]
    ds = load(frame)
    batch = ds.batch_of_groups(np.arange(ds.num_groups))
    assert batch.sequence_features["history"].lengths().tolist() == [0, 0, 0, 0, 0]
