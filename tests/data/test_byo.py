"""Bring your own data: a table + the example schema YAML become the same validated samples and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import load_data

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "configs" / "schema_example.yaml"


def shop_frame() -> pd.DataFrame:
    """Two requests of user 7 (2 and 1 candidates) and one of user 9 (2 candidates), rows interleaved."""
    return pd.DataFrame(
        {
            "user_id": [7, 9, 7, 9, 7],
            "request_id": ["r1", "r3", "r1", "r3", "r2"],
            "ts": [100, 300, 100, 300, 200],
            "country": ["de", "fr", "de", "fr", "de"],
            "categories": [[1, 2], [3], [], [4, 5, 6], [2]],
            "history": [[10, 11], [], [10, 11], [], [10, 11, 12]],
            "item_id": [12, 40, 13, 41, 14],
            "price": [9.5, 1.0, 3.0, 2.5, 7.0],
            "clicked": [1, 0, 0, 1, 1],
            "purchased": [1, 0, np.nan, 0, 0],
            "purchase_known": [1, 1, 0, 1, 0],
            "dwell_seconds": [30.0, np.nan, np.nan, 12.5, 3.0],
        }
    )


def check_shop_dataset(ds: TabularDataset) -> None:
    # groups are made contiguous in first-appearance order: r1 (rows 0, 2), r3 (1, 3), r2 (4)
    assert ds.num_groups == 3
    assert ds.group_sizes().tolist() == [2, 2, 1]
    batch = ds.batch_of_groups(np.array([0, 1, 2]))
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2]
    seq = batch.sequence_features.to_dict()
    # the per-group history is carried on each group's first row only
    assert seq["history"].lengths().tolist() == [2, 0, 0, 0, 3]
    assert seq["history"].values().tolist() == [10, 11, 10, 11, 12]
    assert seq["target_item"].values().tolist() == [12, 13, 40, 41, 14]
    sparse = batch.sparse_features.to_dict()
    assert sparse["item_categories"].lengths().tolist() == [2, 0, 1, 3, 1]
    assert sparse["item_categories"].values().tolist() == [1, 2, 3, 4, 5, 6, 2]
    assert sparse["user_id"].values().tolist() == [7, 7, 9, 9, 7]
    country = sparse["country"].values().tolist()
    assert country[0] == country[1] == country[4] != country[2] == country[3]
    assert all(0 <= c < 64 for c in country)
    assert batch.dense_features[:, 0].tolist() == [9.5, 3.0, 1.0, 2.5, 7.0]
    assert batch.task_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]]
    assert batch.labels.tolist() == [[1, 1, 30.0], [0, 0, 0], [0, 0, 0], [1, 0, 12.5], [1, 0, 3.0]]
    assert ds.report.hashed_ids == {"country": 5}


def test_dataframe_with_lists() -> None:
    check_shop_dataset(TabularDataset(shop_frame(), Schema.from_yaml(SCHEMA), "shop"))


def test_csv_and_parquet_through_load_data(tmp_path: Path) -> None:
    frame = shop_frame()
    csv = frame.copy()
    for column in ("categories", "history"):
        csv[column] = [" ".join(map(str, v)) for v in frame[column]]  # CSV holds lists as "1 2 3"
    csv.to_csv(tmp_path / "train.csv", index=False)
    frame.to_parquet(tmp_path / "valid.parquet")
    cfg = DataConfig(
        source="table",
        schema=str(SCHEMA),
        table=str(tmp_path / "train.csv"),
        valid_table=str(tmp_path / "valid.parquet"),
    )
    data = load_data(cfg)
    assert sorted(data.splits) == ["train", "valid"]
    check_shop_dataset(data.splits["train"])
    check_shop_dataset(data.splits["valid"])
    summary = data.summary()
    assert summary["splits"]["train"]["labelled"] == {"click": 5, "purchase": 3, "dwell": 3}


def test_task_selection_and_unknown_task(tmp_path: Path) -> None:
    schema = Schema.from_yaml(SCHEMA).select_tasks(["dwell", "click"])
    ds = TabularDataset(shop_frame(), schema, "shop")
    assert [t.name for t in ds.tasks] == ["dwell", "click"]
    assert ds.labels[:, 0].tolist() == [30.0, 0.0, 0.0, 12.5, 3.0]
    with pytest.raises(ValueError, match=r"data.tasks: unknown task\(s\) \['clicks'\] \(known: \['click'"):
        Schema.from_yaml(SCHEMA).select_tasks(["clicks"])
