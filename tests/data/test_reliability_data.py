"""Issue 14, data side: bad inputs that used to crash without a file, row or column, and the report's new counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supermoe_rec.config.experiment import ConfigError, DataConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.features import read_table
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import SplitData, load_data

from .test_byo import SCHEMA, shop_frame


def load(frame: pd.DataFrame, max_history: int | None = None) -> TabularDataset:
    if max_history is None:  # the plain call, as before max_history existed
        return TabularDataset(frame, Schema.from_yaml(SCHEMA), "shop.csv")
    return TabularDataset(frame, Schema.from_yaml(SCHEMA), "shop.csv", max_history=max_history)


def test_string_timestamp_names_row_and_column() -> None:
    # Before: ValueError: invalid literal for int() with base 10: 'yesterday' (no file, row or column).
    frame = shop_frame()
    frame["ts"] = frame["ts"].astype(object)
    frame.at[2, "ts"] = "yesterday"
    with pytest.raises(DataError, match=r"^shop.csv: row 2, column 'ts': timestamp is not an integer: 'yesterday'$"):
        load(frame)


def test_fractional_timestamp_is_an_error() -> None:
    frame = shop_frame()
    frame["ts"] = frame["ts"].astype(np.float64)
    frame.at[3, "ts"] = 300.5
    with pytest.raises(DataError, match=r"row 3, column 'ts': timestamp is not an integer: 300.5$"):
        load(frame)


def test_float_timestamps_that_are_whole_numbers_load() -> None:
    frame = shop_frame()
    frame["ts"] = frame["ts"].astype(np.float64)
    ds = load(frame)
    assert ds.timestamps is not None and ds.timestamps.dtype == np.int64
    assert sorted(ds.timestamps.tolist()) == [100, 100, 200, 300, 300]


def test_nan_group_id_names_row_and_column() -> None:
    # Before: ValueError: 'list' argument must have no negative elements (from np.bincount).
    frame = shop_frame()
    frame.at[3, "request_id"] = np.nan
    with pytest.raises(DataError, match=r"^shop.csv: row 3, column 'request_id': missing group id$"):
        load(frame)


def test_malformed_schema_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    # Before: a raw yaml.parser.ParserError.
    bad = tmp_path / "schema.yaml"
    bad.write_text("user_column: user_id\ntables: [{name: item, num_embeddings: 10}\n")
    with pytest.raises(ConfigError, match=r"schema.yaml: not valid YAML: .*\(line 3, column 1\)$") as info:
        Schema.from_yaml(bad)
    assert "\n" not in str(info.value)


def test_directory_as_table_says_it_is_a_directory(tmp_path: Path) -> None:
    # Before: "file not found", for a path that exists.
    with pytest.raises(DataError, match=r"is a directory, not a table file"):
        read_table(tmp_path)
    cfg = DataConfig(source="table", schema=str(SCHEMA), table=str(tmp_path))
    with pytest.raises(DataError, match=rf"^{tmp_path}: is a directory"):
        load_data(cfg)


def test_truncated_histories_are_counted() -> None:
    # histories by row: [10, 11], [], [10, 11], [], [10, 11, 12]
    assert load(shop_frame()).report.histories_truncated == 0
    assert load(shop_frame(), max_history=3).report.histories_truncated == 0
    assert load(shop_frame(), max_history=2).report.as_dict()["histories_truncated"] == 1
    assert load(shop_frame(), max_history=1).report.histories_truncated == 3


def test_exact_duplicate_rows_are_counted_not_dropped() -> None:
    frame = shop_frame()
    assert load(frame).report.duplicate_rows == 0
    doubled = pd.concat([frame, frame.iloc[[0, 4]]], ignore_index=True)
    ds = load(doubled)
    assert ds.report.as_dict()["duplicate_rows"] == 2
    assert len(ds) == len(doubled)  # kept
    # A row that differs in one list item, or only in a label, is not a duplicate.
    near = pd.concat([frame, frame.iloc[[0]], frame.iloc[[4]]], ignore_index=True)
    near.at[5, "categories"] = [1, 3]
    near.at[6, "dwell_seconds"] = 4.0
    assert load(near).report.duplicate_rows == 0
    # List order matters: [1, 2] and [2, 1] are different rows.
    swapped = pd.concat([frame, frame.iloc[[0]]], ignore_index=True)
    swapped.at[5, "categories"] = [2, 1]
    assert load(swapped).report.duplicate_rows == 0


def test_report_counts_reach_the_summary(tmp_path: Path) -> None:
    frame = pd.concat([shop_frame(), shop_frame().iloc[[1]]], ignore_index=True)
    frame.to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(source="table", schema=str(SCHEMA), table=str(tmp_path / "train.parquet"), max_history=2)
    report = load_data(cfg).summary()["splits"]["train"]["report"]
    assert report["duplicate_rows"] == 1
    assert report["histories_truncated"] == 1


def test_movielens_history_windows_count_as_truncated(ml100k_data: SplitData) -> None:
    # The protocol keeps the last data.max_history (50) ratings before each positive; longer ones are counted.
    summary = ml100k_data.summary()
    for split in ("train", "valid", "test"):
        counted = summary["splits"][split]["report"]["histories_truncated"]
        assert counted == summary["splits"][split]["histories_truncated"] > 0
        ds = ml100k_data.splits[split]
        assert np.diff(ds.features["history"].offsets).max() == 50
    assert summary["splits"]["train"]["report"]["duplicate_rows"] == 0


# ------------------------------------------------------------------------------------------- issue 25


@pytest.mark.parametrize("big", [2**40, 10**20])
def test_sequence_ids_beyond_the_bound_are_refused_naming_the_row(tmp_path: Path, big: int) -> None:
    # Before: 2^40 passed (data summary: items 1099511627776, then a planner traceback); 10^20 an OverflowError.
    from supermoe_rec.data.sequences import MAX_ID, read_sequences

    path = tmp_path / "seq.txt"
    path.write_text(f"1 1 2 3\n2 4 {big} 5\n")
    with pytest.raises(DataError, match=rf"^{path}: row 1: id {big} is above the largest id supported, {MAX_ID}"):
        read_sequences(path)


@pytest.mark.parametrize("big", ["100000000000000000000", "18446744073709551615"])
def test_table_ids_beyond_64_bits_are_refused_naming_row_and_column(tmp_path: Path, big: str) -> None:
    # Before: wrapped to a negative id (uint64) or an arbitrary one (10^20 through float).
    from supermoe_rec.data.features import table_ids
    from supermoe_rec.data.schema import FeatureSpec, TableSpec

    path = tmp_path / "t.csv"
    path.write_text(f"item\n1\n{big}\n")
    values = read_table(path)["item"].to_numpy()
    spec, table = FeatureSpec(name="item", column="item", table="item"), TableSpec(name="item", num_embeddings=10)
    with pytest.raises(DataError, match=rf"^t.csv: row 1, column 'item': id {big} is outside table 'item' of 10 rows"):
        table_ids(values, spec, table, "t.csv", offsets=np.arange(3))


def test_non_utf8_files_name_the_byte_offset(tmp_path: Path) -> None:
    # Before: UnicodeDecodeError tracebacks for a sequence file, a CSV table and a config.
    from supermoe_rec.config.experiment import load_config
    from supermoe_rec.data.sequences import read_sequences

    seq = tmp_path / "seq.txt"
    seq.write_bytes(b"1 1 2 3\n2 4 5 6 \xff\n")
    with pytest.raises(DataError, match=rf"^{seq}: row 1: not UTF-8 text: byte 0xff at byte offset 16$"):
        read_sequences(seq)
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"item,name\n1,ok\n2,caf\xe9\n")
    with pytest.raises(DataError, match=rf"^{csv}: row 1: not UTF-8 text: byte 0xe9 at byte offset 20$"):
        read_table(csv)
    config = tmp_path / "c.yaml"
    config.write_bytes(b"train:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{config}: not UTF-8 text: byte 0xe9 at byte offset 18$"):
        load_config(config)
    schema = tmp_path / "schema.yaml"
    schema.write_bytes(b"user_column: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{schema}: not UTF-8 text: byte 0xe9 at byte offset 16$"):
        Schema.from_yaml(schema)
