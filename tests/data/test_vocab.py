"""Vocabularies (issue 16 item 1), the schema's load-time checks (item 3) and the table summary's counts (item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from supermoe_rec.config.experiment import ConfigError, DataConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import load_data, load_run_data
from supermoe_rec.data.vocab import Vocabulary, load_vocabularies, save_vocabularies

ROOT = Path(__file__).resolve().parents[2]

SCHEMA = """
user_column: user
group_column: request
tables:
  - {name: user, vocab: true}
  - {name: item, vocab: true}
  - {name: occupation, vocab: {min_count: 2}}
  - {name: year, vocab: true}
sparse_features:
  - {name: user, column: user, table: user, side: user}
  - {name: occupation, column: occupation, table: occupation, side: user}
  - {name: year, column: year, table: year}
sequence_features:
  - {name: history, column: history, table: item, multi_valued: true, per_group: true}
  - {name: item, column: item, table: item}
tasks:
  - {name: click, type: binary, label: click}
  - {name: stars, type: regression, label: stars}
"""


def train_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": ["ann", "ann", "bob", "bob", "cy"],
            "request": ["r1", "r1", "r2", "r2", "r3"],
            "occupation": ["nurse", "nurse", "chef", "chef", "pilot"],
            "year": [1970, 1970, 1999, 1970, 2004],  # years: would overflow a small table as ids
            "history": [["m9", "m2"], ["m9", "m2"], ["m2"], ["m2"], []],
            "item": ["m1", "m2", "m3", "m9", "m1"],
            "click": [1, 0, 1, 0, 1],
            "stars": [4.0, np.nan, 5.0, np.nan, 3.0],
        }
    )


def write_tables(tmp_path: Path, valid: pd.DataFrame | None = None) -> DataConfig:
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    train_frame().to_parquet(tmp_path / "train.parquet")
    (valid if valid is not None else train_frame()).to_parquet(tmp_path / "valid.parquet")
    return DataConfig(
        source="table",
        schema=str(tmp_path / "schema.yaml"),
        table=str(tmp_path / "train.parquet"),
        valid_table=str(tmp_path / "valid.parquet"),
    )


def test_vocabulary_order_and_oov_row() -> None:
    """Most frequent first, ties by text; row 0 = unknown; the order does not depend on the row order."""
    values = np.array(["b", "a", "c", "a", "b", "d"], dtype=object)
    vocab = Vocabulary.build("t", values)
    assert vocab.tokens == ("a", "b", "c", "d") and vocab.num_embeddings == 5
    assert Vocabulary.build("t", values[::-1].copy()).tokens == vocab.tokens
    assert vocab.lookup(np.array(["d", "zzz", "a"], dtype=object)).tolist() == [4, 0, 1]
    assert Vocabulary.build("t", values, min_count=2).tokens == ("a", "b")
    # integers, integer-valued floats and their text are one value
    ints = Vocabulary.build("t", np.array([5, 7, 5]))
    assert ints.lookup(np.array([5.0, 7.0])).tolist() == [1, 2]
    assert ints.lookup(np.array(["5", "7", "8"], dtype=object)).tolist() == [1, 2, 0]


def test_vocab_tables_from_the_train_file(tmp_path: Path) -> None:
    valid = train_frame()
    valid.loc[0, "item"] = "m404"  # unknown item
    valid.loc[1, "history"] = ["m9", "m404"]  # unknown inside a history (and the group's rows still agree)
    valid.loc[0, "history"] = ["m9", "m404"]
    valid.loc[4, "occupation"] = "astronaut"
    valid.loc[4, "year"] = 1850
    data = load_data(write_tables(tmp_path, valid))
    train = data.splits["train"]
    # the item table is shared by the history and the target: m2 x4, m9 x3, m1 x2, m3 x1
    assert data.vocabularies["item"].tokens == ("m2", "m9", "m1", "m3")
    assert train.features["item"].values.tolist() == [3, 1, 4, 2, 3]
    assert train.features["history"].values.tolist() == [2, 1, 2, 1, 1, 1]
    # num_embeddings is derived: the vocabulary plus row 0
    sizes = {t.name: t.num_embeddings for t in data.schema.tables}
    assert sizes == {"user": 4, "item": 5, "occupation": 3, "year": 4}
    # min_count 2: pilot (1 row) stays out, to row 0, counted in train's report
    assert data.vocabularies["occupation"].tokens == ("chef", "nurse")
    assert train.report.vocab_oov == {"user": 0, "occupation": 1, "year": 0, "history": 0, "item": 0}
    # unknowns in valid: row 0, counted
    valid_ds = data.splits["valid"]
    assert valid_ds.features["item"].values[0] == 0
    assert valid_ds.report.vocab_oov == {"user": 0, "occupation": 1, "year": 1, "history": 2, "item": 1}
    summary = data.summary()
    assert summary["vocabularies"] == sizes
    assert summary["splits"]["valid"]["report"]["vocab_oov"]["item"] == 1


def test_vocabularies_saved_and_reused(tmp_path: Path) -> None:
    """A run's saved vocab.json maps the data as in training, even when the train file has changed since."""
    cfg = write_tables(tmp_path)
    data = load_data(cfg)
    path = save_vocabularies(data.vocabularies, tmp_path)
    assert path == tmp_path / "vocab.json"
    loaded = load_vocabularies(tmp_path)
    assert loaded == data.vocabularies
    changed = train_frame()
    changed["item"] = ["m3", "m3", "m3", "m3", "m7"]  # other counts: a rebuilt vocabulary would differ
    changed.to_parquet(tmp_path / "train.parquet")
    assert load_data(cfg).vocabularies["item"] != data.vocabularies["item"]
    again = load_data(cfg, vocabularies=loaded)
    assert again.vocabularies == data.vocabularies
    assert load_run_data(cfg, tmp_path).vocabularies == data.vocabularies  # a run dir holding vocab.json
    reused, original = again.splits["valid"].features["item"], data.splits["valid"].features["item"]
    assert reused.values.tolist() == original.values.tolist()
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(DataError, match="not a vocabulary file"):
        load_vocabularies(tmp_path / "vocab.json")


def test_missing_value_in_vocab_table_is_oov() -> None:
    frame = train_frame()
    frame["occupation"] = frame["occupation"].astype(object)
    frame.loc[2, "occupation"] = None
    frame.loc[3, "occupation"] = None
    ds = TabularDataset(frame, Schema.from_dict(yaml.safe_load(SCHEMA)), "t")
    assert ds.report.vocab_oov["occupation"] == 3  # two missing, pilot below min_count


def _schema(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "user_column": "u",
        "group_column": "g",
        "tables": [{"name": "item", "num_embeddings": 10}, {"name": "genre", "vocab": True}],
        "sparse_features": [{"name": "genres", "column": "genres", "table": "genre", "multi_valued": True}],
        "sequence_features": [
            {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
            {"name": "target", "column": "i", "table": "item"},
        ],
        "tasks": [{"name": "click", "type": "binary", "label": "y"}],
    }
    values.update(changes)
    return values


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # forgetting per_group on the history: it would be pooled into the candidate, the encoder sees no history
        (
            {
                "sequence_features": [
                    {"name": "history", "column": "h", "table": "item", "multi_valued": True},
                    {"name": "target", "column": "i", "table": "item"},
                ]
            },
            r"sequence_features.history.per_group: a list of ids that shares table 'item' with \['target'\]",
        ),
        # per_group without a group column: every row its own group
        ({"group_column": None}, r"sequence_features.history.per_group needs group_column"),
        (
            {"tables": [{"name": "item", "num_embeddings": 10}, {"name": "genre", "vocab": True, "num_embeddings": 5}]},
            r"tables.genre.num_embeddings: derived from the vocabulary",
        ),
        (
            {"tables": [{"name": "item", "num_embeddings": 10}, {"name": "genre", "vocab": True, "hash": True}]},
            r"tables.genre.hash: a vocab table",
        ),
        (
            {"tables": [{"name": "item", "num_embeddings": 10}, {"name": "genre", "vocab": {"min_count": 0}}]},
            r"tables.genre.vocab.min_count must be at least 1",
        ),
        (
            {"tables": [{"name": "item", "num_embeddings": 10}, {"name": "genre"}]},
            r"tables.genre.num_embeddings must be positive \(or set vocab: true",
        ),
    ],
)
def test_silent_misconfigurations_are_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Schema.from_dict(_schema(**changes), source="s.yaml")
    Schema.from_dict(_schema(), source="s.yaml")  # the unchanged schema is fine


def test_task_names_checked_against_the_schema() -> None:
    schema = Schema.from_dict(_schema(), source="s.yaml")
    schema.check_task_names(["click"], {"click": 2.0})
    with pytest.raises(ConfigError, match=r"^train.loss.task_weights: unknown task\(s\) \['watch'\]"):
        schema.check_task_names([], {"watch": 2.0})
    with pytest.raises(ConfigError, match=r"^data.tasks: unknown task\(s\) \['like'\]"):
        schema.check_task_names(["like"], {})


def test_table_summary_counts(tmp_path: Path) -> None:
    """The table summary: rows, samples, groups, and positives/negatives of every binary task."""
    summary = load_data(write_tables(tmp_path)).summary()
    assert summary["rows"] == 10  # train + valid rows
    train = summary["splits"]["train"]
    assert (train["rows"], train["samples"], train["groups"], train["users"]) == (5, 5, 3, 3)
    assert train["binary_labels"] == {"click": {"positives": 3, "negatives": 2}}
    assert train["labelled"] == {"click": 5, "stars": 3}


def test_table_config_checked_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Task names against the schema, before any data; ml-mt-only keys with source: table get a warning."""
    from supermoe_rec.config.experiment import ExperimentConfig, apply_overrides
    from supermoe_rec.data.schema import check_table_config

    (tmp_path / "schema.yaml").write_text(SCHEMA)
    table = ["--data.source=table", f"--data.schema={tmp_path / 'schema.yaml'}", "--data.table=missing.parquet"]
    assert check_table_config(apply_overrides(ExperimentConfig(), table)) == []
    with pytest.raises(ConfigError, match=r"^train.loss.task_weights: unknown task\(s\) \['watch'\]"):
        check_table_config(apply_overrides(ExperimentConfig(), [*table, "--train.loss.task_weights={watch: 2}"]))
    with pytest.raises(ConfigError, match=r"^data.tasks: unknown task\(s\) \['like'\]"):
        check_table_config(apply_overrides(ExperimentConfig(), [*table, "--data.tasks=[like]"]))
    with caplog.at_level("WARNING"):
        warnings = check_table_config(
            apply_overrides(ExperimentConfig(), [*table, "--data.seed=3", "--data.valid_fraction=0.2"])
        )
    assert len(warnings) == 1 and "data.seed, data.valid_fraction apply to the ml-mt protocol" in warnings[0]
    assert warnings[0] in caplog.text
    # the ml-mt defaults of a MovieLens config are no reason to warn, and a MovieLens config is not checked
    assert check_table_config(apply_overrides(ExperimentConfig(), ["--data.seed=3"])) == []


def test_load_config_refuses_unknown_task_weights(tmp_path: Path) -> None:
    """The issue's case: configs/ml100k.yaml's task weight on 'watch' with a schema that has no watch task fails at
    load, naming the key, instead of after the data has loaded."""
    from supermoe_rec.config.experiment import load_config

    (tmp_path / "schema.yaml").write_text(SCHEMA)
    table = ["--data.source=table", f"--data.schema={tmp_path / 'schema.yaml'}", "--data.table=t.parquet"]
    with pytest.raises(ConfigError, match=r"^train.loss.task_weights: unknown task\(s\) \['watch'\]"):
        load_config(ROOT / "configs" / "ml100k.yaml", table)
    cfg = load_config(ROOT / "configs" / "byo.yaml", table)  # the template has no task weights
    assert cfg.data.source == "table" and cfg.train.loss.task_weights == {}


def test_hashed_ids_agree_across_types() -> None:
    """A hash table hashes values as their text: ints (parquet), whole floats (CSV with NaN) and strings (a CSV
    list) of one id land on one row, in training (TabularDataset) and serving (both call hash_ids)."""
    from supermoe_rec.data.vocab import hash_ids

    rows = hash_ids(np.array([5, 7]), 64).tolist()
    assert (
        rows == hash_ids(np.array([5.0, 7.0]), 64).tolist() == hash_ids(np.array(["5", "7"], dtype=object), 64).tolist()
    )
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "tables": [{"name": "t", "num_embeddings": 64, "hash": True}],
            "sparse_features": [{"name": "tags", "column": "tags", "table": "t", "multi_valued": True}],
            "tasks": [{"name": "y", "type": "binary", "label": "y"}],
        }
    )
    ints = TabularDataset(pd.DataFrame({"u": [1], "tags": [[5, 7]], "y": [1]}), schema, "t")
    text = TabularDataset(pd.DataFrame({"u": [1], "tags": ["[5 7]"], "y": [1]}), schema, "t")
    assert ints.features["tags"].values.tolist() == text.features["tags"].values.tolist() == rows
