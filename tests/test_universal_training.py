"""The next-items objective end to end on real ML-100k: future items in the protocol, pretrain then fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from supermoe_rec.config.experiment import DataConfig, ExperimentConfig, apply_overrides
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.protocol import build_ml_mt
from supermoe_rec.data.splits import SplitData, from_movielens
from supermoe_rec.training.trainer import train

TINY = [
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
    "--train.num_threads=1",
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=32",
    "--model.embedding_dim=16",
    "--model.moe.moe_every=1",
    "--data.next_window=2",
]


def test_future_items_are_the_users_next_ratings_within_the_split(ml100k: MovieLens) -> None:
    out = build_ml_mt(ml100k, DataConfig(next_window=3))
    assert out.schema.next_items == "next_items"
    user = int(ml100k.ratings["user_id"].iloc[0])
    ratings = ml100k.ratings[ml100k.ratings["user_id"] == user].sort_values(["timestamp", "item_id"], kind="stable")
    items = np.sort(ml100k.items["item_id"].to_numpy())
    codes = (np.searchsorted(items, ratings["item_id"].to_numpy()) + 1).tolist()
    n = len(codes)
    n_held = max(1, int(np.ceil(0.1 * n - 1e-9)))
    train_end = n - 2 * n_held
    frame = out.frames["train"]
    rows = frame[(frame["user_id"] == user) & (frame["watch"] == 1)]
    for position, future in zip(rows["position"], rows["next_items"], strict=True):
        assert list(future) == codes[position : min(position + 3, train_end)], position
    test = out.frames["test"]
    last = test[(test["user_id"] == user) & (test["watch"] == 1)].iloc[-1]
    assert list(last["next_items"]) == [codes[-1]]  # the last rating: nothing after it


@pytest.fixture(scope="module")
def next_items_data(ml100k: MovieLens) -> SplitData:
    return from_movielens(ml100k, DataConfig(next_window=2))


def _run(tmp_path: Path, name: str, data: SplitData, *overrides: str) -> dict[str, object]:
    cfg = apply_overrides(
        ExperimentConfig(), [*TINY, f"--train.out_dir={tmp_path}", f"--train.name={name}", *overrides]
    )
    result = train(cfg, data)
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved["test"]["tasks"] == result["test"]["tasks"]
    return result


def test_pretrain_then_fine_tune(tmp_path: Path, next_items_data: SplitData) -> None:
    pretrained = _run(tmp_path, "pre", next_items_data, "--train.objective=next_items", "--train.max_steps=4")
    test = pretrained["test"]
    assert test["next_items_loss"] > 0  # type: ignore[index]
    # Retrieval of every test sample's next item over the whole catalogue (the full softmax's candidates).
    ranked = test["next_item"]  # type: ignore[index]
    assert ranked["targets"] == 10_439  # the test positives of ml100k-mt (docs/protocol.md#expected-sizes)
    assert 0 < ranked["mrr@10"] <= ranked["ndcg@10"] <= ranked["hr@10"] <= 1
    # No steps: what is tested is exactly what was loaded.
    tuned = _run(
        tmp_path, "tuned", next_items_data, "--train.objective=joint", "--train.max_steps=0",
        f"--train.init_from={tmp_path / 'pre'}",
    )  # fmt: skip
    fresh = _run(tmp_path, "fresh", next_items_data, "--train.objective=joint", "--train.max_steps=0")
    assert tuned["test"]["tasks"] == pretrained["test"]["tasks"]  # type: ignore[index]
    assert tuned["test"]["tasks"] != fresh["test"]["tasks"]  # type: ignore[index]


def test_leave_one_out_split_is_the_retrieval_protocols(ml100k: MovieLens) -> None:
    """A leave_one_out run trains on exactly RecBole's training targets and holds out the suite's valid/test ones."""
    from supermoe_rec.evaluation.retrieval import user_sequences

    out = build_ml_mt(ml100k, DataConfig(leave_one_out=True))
    seqs = user_sequences(ml100k.ratings, ml100k.items["item_id"].to_numpy())
    positives = {name: frame[frame["watch"] == 1] for name, frame in out.frames.items()}
    assert len(positives["train"]) == 97_171  # RecBole's training targets on ml-100k
    for split in ("valid", "test"):
        got = positives[split].sort_values("user_id")
        assert got["user_id"].tolist() == seqs.users.tolist()
        assert got["item"].tolist() == seqs.target(split).tolist()
        values, offsets = seqs.inputs(split)
        expected = [values[offsets[u] : offsets[u + 1]].tolist() for u in range(len(seqs.users))]
        assert [list(h) for h in got["history"]] == expected
