"""The [USER] vector is trained: a gradient reaches its last-layer output in every objective, through real modules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from supermoe_rec.config.experiment import (
    ConfigError,
    ExperimentConfig,
    Objective,
    apply_overrides,
)
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.dataset import TabularDataset, spread_candidates
from supermoe_rec.data.schema import Schema
from supermoe_rec.distributed.sharding import build_train_module
from supermoe_rec.models.supermoe import SuperMoERec
from supermoe_rec.models.train_module import TrainModule
from supermoe_rec.objectives.next_items import CandidateSource, Softmax

N_ITEMS = 30


def _schema() -> Schema:
    return Schema.from_dict(
        {
            "user_column": "u",
            "group_column": "g",
            "tables": [{"name": "user", "num_embeddings": 10}, {"name": "item", "num_embeddings": N_ITEMS}],
            "sparse_features": [{"name": "user", "column": "u", "table": "user", "side": "user"}],
            "sequence_features": [
                {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "target_item", "column": "i", "table": "item"},
                {"name": "next_items", "column": "n", "table": "item", "multi_valued": True, "per_group": True},
            ],
            "next_items": "next_items",
            "tasks": [{"name": "click", "type": "binary", "label": "y"}],
        },
        source="test",
    )


def _batch(schema: Schema, softmax: Softmax = Softmax.FULL) -> Batch:
    rng = np.random.default_rng(0)
    rows = []
    for g in range(6):
        history = rng.integers(1, N_ITEMS, size=int(rng.integers(1, 6))).tolist()
        future = rng.choice(np.arange(1, N_ITEMS), size=int(rng.integers(1, 4)), replace=False).tolist()
        for label in (1, 0):
            target = future[0] if label else int(rng.integers(1, N_ITEMS))
            rows.append({"u": g % 4 + 1, "g": g, "h": history, "i": target, "n": future, "y": label})
    ds = TabularDataset(pd.DataFrame(rows), schema, "test")
    candidates = CandidateSource(softmax, N_ITEMS, num_sampled=12, seed=0)(0)
    return ds.batch_of_groups(np.arange(ds.num_groups), candidates)


def _module(schema: Schema, *overrides: str) -> TrainModule:
    cfg = apply_overrides(ExperimentConfig(), ["--data.next_window=3", *overrides])
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    return build_train_module(cfg, schema, device=cpu, sparse_device=cpu, optimizers=False)


def _user_grad(module: TrainModule, batch: Batch) -> torch.Tensor | None:
    """The gradient of the step's loss with respect to the [USER] token's last-layer output."""
    out = module.model(batch)
    assert out.user is not None
    out.user.retain_grad()
    loss, _ = module.head(out, batch)
    loss.backward()
    return out.user.grad


@pytest.mark.parametrize(
    ("overrides", "reaches"),
    [
        ((), False),  # today's supervised model: the towers read the task tokens only
        (("--model.towers.read_user=true",), True),
        (("--train.objective=joint",), True),
        (("--train.objective=next_items",), True),
        (("--train.objective=next_items", "--model.arch=dense_transformer"), True),
    ],
)
def test_gradient_reaches_the_user_vector(overrides: tuple[str, ...], reaches: bool) -> None:
    schema = _schema()
    grad = _user_grad(_module(schema, *overrides), _batch(schema))
    if reaches:
        assert grad is not None and float(grad.abs().sum()) > 0
    else:
        assert grad is None or float(grad.abs().sum()) == 0


def test_self_supervised_objective_reads_no_task_label() -> None:
    schema = _schema()
    module = _module(schema, "--train.objective=next_items")
    batch = _batch(schema)
    batch.labels = torch.full_like(batch.labels, float("nan"))  # a raw log: no labels at all
    loss, out = module(batch)
    assert torch.isfinite(loss)
    loss.backward()
    towers = [p.grad for p in module.model.towers.parameters()]
    assert all(g is None or float(g.abs().sum()) == 0 for g in towers)
    assert out.loss.next_items is not None and float(out.loss.next_items) > 0


@pytest.mark.parametrize("softmax", [Softmax.FULL, Softmax.SAMPLED])
def test_next_items_inputs_are_the_item_table_rows(softmax: Softmax) -> None:
    schema = _schema()
    module = _module(schema, "--train.objective=joint")
    batch = _batch(schema, softmax)
    model = module.model
    assert isinstance(model, SuperMoERec)
    out = model(batch)
    ni = out.next_items
    assert ni is not None
    table = model.sparse_arch.sequence_ebc.embedding_bags["item"].weight  # type: ignore[union-attr,index]
    torch.testing.assert_close(ni.candidates, table[ni.candidate_ids])
    expected_ids = CandidateSource(softmax, N_ITEMS, num_sampled=12, seed=0)(0)
    assert ni.candidate_ids.tolist() == expected_ids.tolist()
    mask = ni.positive_mask.bool()
    torch.testing.assert_close(ni.positives[mask], table[ni.positive_ids[mask]])
    # The groups' future items, in order: the frame's "n" column.
    assert int(mask.sum()) == sum(len(x) for x in batch.sequence_features["next_items"].to_dense())
    # Retrieval scores the same way the loss does.
    scores = model.over_arch.score_items(out.user, table)
    torch.testing.assert_close(scores[:, ni.candidate_ids], ni.query @ ni.candidates.T)


def test_objectives_need_future_items_and_a_user_token() -> None:
    with pytest.raises(ConfigError, match=r"data\.next_window"):
        apply_overrides(ExperimentConfig(), ["--train.objective=joint"])
    with pytest.raises(ConfigError, match=r"train\.objective"):
        apply_overrides(ExperimentConfig(), ["--train.objective=joint", "--data.next_window=1", "--model.arch=mmoe"])
    cfg = apply_overrides(ExperimentConfig(), ["--train.objective=next_items", "--data.next_window=2"])
    assert cfg.train.objective is Objective.NEXT_ITEMS


def test_catalogue_rank_needs_the_catalogue() -> None:
    schema = _schema()
    module = _module(schema, "--train.objective=joint")
    full = _batch(schema)
    _, out = module(full)
    assert out.next_item_rank is None  # a training step does not rank the catalogue: only evaluation reports it
    module.eval()
    _, out = module(full)
    assert out.next_item_rank is not None and int(out.next_item_rank.min()) >= 1  # 1-based: every group ranked
    # Batches built without candidates (export, probes) still run, and rank nothing.
    ds_batch = _batch(schema)
    ds_batch.sequence_features = KeyedJaggedTensor.concat(
        [
            ds_batch.sequence_features.split([3, 1])[0],
            spread_candidates(None, ds_batch.batch_size),
        ]
    )
    _, out = module(ds_batch)
    assert out.next_item_rank is None
