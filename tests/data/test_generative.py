"""The generative layout's rules on small hand-made data: chunks, ownership, and every bad input named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from supermoe_rec.config.experiment import ConfigError, ExperimentConfig, apply_overrides
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.generative import UserSequences, apply_layout, plan_chunks, regroup
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import SplitData

SCHEMA = Schema.from_dict(
    {
        "user_column": "u",
        "group_column": "g",
        "tables": [{"name": "item", "num_embeddings": 20}],
        "sequence_features": [
            {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
            {"name": "target_item", "column": "i", "table": "item"},
        ],
        "tasks": [{"name": "y", "type": "binary", "label": "y"}],
    }
)
# User 7 rated items 1..6 in order, user 3 rated 9, 8, 7. Windows of 2 items.
SEQUENCES = UserSequences.from_lists(np.array([7, 3]), [np.arange(1, 7), np.array([9, 8, 7])])


def _samples(rows: list[tuple[int, int]], window: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """One positive row per (user, position p): the history is the window before p, the target the item at p."""
    seqs = {7: list(range(1, 7)), 3: [9, 8, 7]}
    frame = pd.DataFrame(
        {
            "u": [u for u, _ in rows],
            "g": list(range(len(rows))),
            "h": [seqs[u][max(0, p - window) : p] for u, p in rows],
            "i": [seqs[u][p] for u, p in rows],
            "y": [1.0] * len(rows),
        }
    )
    return frame, np.array([p for _, p in rows], dtype=np.int64)


def _dataset(rows: list[tuple[int, int]]) -> tuple[TabularDataset, np.ndarray]:
    frame, positions = _samples(rows)
    ds = TabularDataset(frame, SCHEMA, "demo.csv")
    return ds, positions[ds.input_row]


def test_rows_are_grouped_per_user_and_read_the_token_after_their_history() -> None:
    ds, positions = _dataset([(7, 3), (3, 1), (7, 1), (7, 5), (3, 2), (7, 2)])
    out, report = regroup(ds, positions, SEQUENCES, "history", chunk_length=10, context=2)
    assert out.num_groups == 2 and report.users == 2 and report.chunks == 2 and report.rows == 6
    assert out.user_keys.tolist() == [3, 3, 7, 7, 7, 7]  # users in key order, positions in order
    assert out.position_index is not None and out.target_start is not None
    assert out.position_index.tolist() == [1, 2, 1, 2, 3, 5]  # chunks start at item 0: token p
    assert out.target_start.tolist() == [1, 1]  # the first targets: position 1 of each user
    history = out.features["history"]
    assert history.values.tolist() == [9, 8, 7, 1, 2, 3, 4, 5, 6]  # each chunk up to its last target, inclusive
    assert np.diff(history.offsets).tolist() == [3, 0, 6, 0, 0, 0]  # on the group's first row only
    assert ds.position_index is None  # the per-group dataset is not changed


def test_a_long_user_is_chunked_and_every_target_is_owned_once() -> None:
    assert plan_chunks(1, 6, chunk_length=4, context=2) == [(0, 1, 3), (1, 3, 5), (3, 5, 6)]
    ds, positions = _dataset([(7, p) for p in range(1, 6)])
    out, report = regroup(ds, positions, SEQUENCES, "history", chunk_length=4, context=2)
    assert report.chunks == 3 and report.users_chunked == 1 and report.targets == 5
    assert out.target_start is not None and out.position_index is not None
    assert out.target_start.tolist() == [1, 2, 2]  # chunk 1 and 2 hold 2 items of context before their first target
    assert out.position_index.tolist() == [1, 2, 2, 3, 2]
    lengths = np.diff(out.features["history"].offsets)[out.group_offsets[:-1]]
    assert lengths.tolist() == [3, 4, 3]  # items [0, 3), [1, 5), [3, 6)
    with pytest.raises(ValueError, match="must exceed the context"):
        plan_chunks(1, 6, chunk_length=2, context=2)


def test_a_row_whose_history_is_not_its_users_past_is_named() -> None:
    frame, positions = _samples([(7, 3), (7, 4)])
    frame.at[1, "h"] = [3, 9]  # not the items just before position 4
    ds = TabularDataset(frame, SCHEMA, "demo.csv")
    with pytest.raises(DataError, match=r"demo.csv.*row 1.*history is not the user's items"):
        regroup(ds, positions[ds.input_row], SEQUENCES, "history", chunk_length=10, context=2)


def test_a_position_outside_the_users_sequence_is_named() -> None:
    ds, positions = _dataset([(3, 1), (3, 2)])
    positions[1] = 3  # user 3 has 3 items: positions 0..2
    with pytest.raises(DataError, match=r"row 1.*outside its user's sequence of 3 items"):
        regroup(ds, positions, SEQUENCES, "history", chunk_length=10, context=2)


def test_a_user_without_a_sequence_is_named() -> None:
    frame, positions = _samples([(3, 1), (3, 2)])
    frame["u"] = [3, 5]
    ds = TabularDataset(frame, SCHEMA, "demo.csv")
    with pytest.raises(DataError, match=r"demo.csv: row 1: user 5 has no item sequence"):
        regroup(ds, positions, SEQUENCES, "history", chunk_length=10, context=2)


def test_a_source_without_sequences_is_refused_with_the_key_to_change() -> None:
    ds, _ = _dataset([(3, 1)])
    data = SplitData(schema=SCHEMA, splits={"train": ds}, info={"source": "demo.csv"})
    cfg = apply_overrides(ExperimentConfig(), ["--model.encoder.generative=true"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.generative=false"):
        apply_layout(data, cfg)
    per_group = apply_overrides(ExperimentConfig(), ["--model.encoder.generative=false"])
    assert apply_layout(data, per_group) is data  # the per-group pass needs no sequences


def test_configs_the_generative_path_cannot_honour_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"data\.next_window: generative training"):
        apply_overrides(ExperimentConfig(), ["--model.encoder.generative=true", "--data.next_window=3"])
    with pytest.raises(ConfigError, match=r"data\.chunk_length: 100 must exceed .* receptive field of 148"):
        apply_overrides(ExperimentConfig(), ["--model.encoder.generative=true", "--data.chunk_length=100"])
    # The per-group pass keeps its windows of future items.
    apply_overrides(ExperimentConfig(), ["--model.encoder.generative=false", "--data.next_window=3"])
