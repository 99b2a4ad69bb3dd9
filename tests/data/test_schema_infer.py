"""``supermoe-rec schema infer`` (issue 16 item 2): a schema proposed from a raw table, with its reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from supermoe_rec import cli
from supermoe_rec.config.experiment import ConfigError
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.infer import infer_schema
from supermoe_rec.data.schema import Schema


def raw_frame(rows: int = 60, seed: int = 0) -> pd.DataFrame:
    """A raw table: string ids and attributes, lists of strings, years, a float, labels with NaN."""
    rng = np.random.default_rng(seed)
    users = [f"user{i}" for i in range(8)]
    gender = {u: "MF"[i % 2] for i, u in enumerate(users)}
    items = [f"sku-{i:03d}" for i in range(20)]
    user = rng.choice(users, rows)
    request = [f"req{i // 2}" for i in range(rows)]
    user = np.repeat(user[::2], 2)[:rows]  # two candidates per request, same user
    history = {r: list(rng.choice(items, int(rng.integers(0, 5)))) for r in set(request)}
    click = rng.integers(0, 2, rows).astype(float)
    return pd.DataFrame(
        {
            "user_id": user,
            "request_id": request,
            "ts": np.arange(rows, dtype=np.int64) * 60 + 1_700_000_000,
            "item_id": rng.choice(items, rows),
            "gender": [gender[u] for u in user],
            "year": rng.choice([1970, 1985, 1999, 2004], rows),
            "tags": [list(rng.choice(["new", "sale", "eco"], int(rng.integers(0, 3)))) for _ in range(rows)],
            "price": rng.random(rows) * 10,
            "recent_items": [history[r] for r in request],
            "row_uuid": [f"x{i}" for i in range(rows)],
            "click": click,
            "stars": np.where(click == 1, rng.integers(1, 6, rows), np.nan),
        }
    ).astype({"user_id": object, "item_id": object, "gender": object, "request_id": object})


def test_infer_roles_and_reasons() -> None:
    frame = raw_frame(rows=200)
    inferred = infer_schema(frame, ["click", "stars"], name="shop")
    v = inferred.values
    assert (v["user_column"], v["group_column"], v["timestamp_column"]) == ("user_id", "request_id", "ts")
    tables = {t["name"]: t for t in v["tables"]}
    assert tables["item"] == {"name": "item", "vocab": True}  # string skus shared by history and candidate
    assert tables["gender"] == {"name": "gender", "vocab": True}
    assert tables["year"] == {"name": "year", "vocab": True}  # 1970..2004, 4 distinct: not max + 1 rows
    assert tables["tags"] == {"name": "tags", "vocab": True}
    sequence = {f["name"]: f for f in v["sequence_features"]}
    assert sequence["recent_items"] == {
        "name": "recent_items",
        "column": "recent_items",
        "table": "item",
        "multi_valued": True,
        "per_group": True,
    }
    assert sequence["item_id"] == {"name": "item_id", "column": "item_id", "table": "item"}
    sparse = {f["name"]: f for f in v["sparse_features"]}
    assert sparse["gender"]["side"] == "user"  # constant per user: profile
    assert sparse["year"]["side"] == "item"
    assert sparse["tags"]["multi_valued"] is True
    assert "row_uuid" not in sparse  # a different value on every row
    assert v["dense_features"] == [{"name": "price", "column": "price"}]
    assert v["tasks"] == [
        {"name": "click", "type": "binary", "label": "click"},
        {"name": "stars", "type": "regression", "label": "stars"},
    ]
    text = inferred.text
    assert "group_column: request_id  # named like a group id" in text
    assert "# a list column named like a history" in text
    assert "#   row_uuid: a different value on every row" in text
    # the YAML is the mapping, and a valid schema that reads the table
    assert yaml.safe_load(text) == v
    ds = TabularDataset(frame, Schema.from_dict(yaml.safe_load(text)), "raw")
    assert ds.num_groups == 100


def test_infer_integer_ids_and_csv_lists(tmp_path: Path) -> None:
    """Dense integer ids get max + 1 rows; lists written by to_csv are recognised as lists."""
    frame = raw_frame()
    codes = {s: i for i, s in enumerate(sorted(set(frame["item_id"]) | {x for h in frame["recent_items"] for x in h}))}
    frame["item_id"] = frame["item_id"].map(codes).astype(np.int64)
    frame["recent_items"] = [[codes[x] for x in h] for h in frame["recent_items"]]
    frame["launch_year"] = [None if i % 5 == 0 else 1990 + i % 3 for i in range(len(frame))]  # CSV: floats, NaN
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    from supermoe_rec.data.features import read_table

    inferred = infer_schema(read_table(path), ["click:binary"])
    tables = {t["name"]: t for t in inferred.values["tables"]}
    assert tables["item"] == {"name": "item", "num_embeddings": max(codes.values()) + 1}
    assert tables["launch_year"] == {"name": "launch_year", "vocab": True}  # whole numbers with gaps: ids
    assert "launch_year: integer values 1990..1992, only 3 distinct: a vocabulary" in inferred.text
    assert "categorical; 12 missing values map to row 0" in inferred.text
    assert {f["name"] for f in inferred.values["sequence_features"]} == {"recent_items", "item_id"}
    assert "tags" in {f["name"] for f in inferred.values["sparse_features"]}


def test_infer_errors() -> None:
    frame = raw_frame()
    with pytest.raises(ConfigError, match="--label: name at least one"):
        infer_schema(frame, [])
    with pytest.raises(ConfigError, match="--label: no column 'clicks'"):
        infer_schema(frame, ["clicks"])
    with pytest.raises(ConfigError, match="no column is named like a user id; name it with --user"):
        infer_schema(frame.rename(columns={"user_id": "who"}), ["click"])
    assert infer_schema(frame.rename(columns={"user_id": "who"}), ["click"], user="who").values["user_column"] == "who"
    with pytest.raises(ConfigError, match=r"'recent_items' looks like a history.*--group"):
        infer_schema(frame.rename(columns={"request_id": "r"}), ["click"])


def test_cli_schema_infer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw_frame().to_parquet(tmp_path / "train.parquet")
    assert cli.main(["schema", "infer", "--table", str(tmp_path / "train.parquet"), "--label", "click,stars"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Proposed by `supermoe-rec schema infer` from train.parquet (60 rows, 12 columns).")
    assert Schema.from_dict(yaml.safe_load(out)).name == tmp_path.name  # a file named train: its folder
    assert cli.main(["schema", "infer", "--table", str(tmp_path / "none.parquet"), "--label", "click"]) == 2
    assert "none.parquet: file not found" in capsys.readouterr().err
