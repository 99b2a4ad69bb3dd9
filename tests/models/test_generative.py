"""Generative training on real MovieLens-100k: one causal pass per user scores every row as the per-prefix passes do.

The reference is the same model on the per-group layout: every (user, position) group encoded on its own, its rows
read at the token after its history. For users whose train sequence fits the 50-item history window, that history is
the whole prefix, so both layouts must give the same predictions, the same loss (task indicators and next items,
normalised the same way) and the same gradients.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from supermoe_rec.config.experiment import (
    DataConfig,
    EncoderConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    MoEConfig,
    NextItemsConfig,
    NextItemsSoftmax,
    Objective,
    TrainConfig,
)
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.generative import apply_layout
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.splits import SplitData, from_movielens
from supermoe_rec.distributed.sharding import build_train_module
from supermoe_rec.objectives.next_items import full_catalogue


def _config() -> ExperimentConfig:
    model = ModelConfig(
        encoder=EncoderConfig(d_model=32, num_layers=2, num_heads=2, ffn_hidden=64, generative=True),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, moe_every=2, dropless=True),
        embedding_dim=16,
    )
    train = TrainConfig(
        objective=Objective.JOINT,
        next_items=NextItemsConfig(softmax=NextItemsSoftmax.FULL),
        # The MoE's auxiliary losses average over the tokens a layout encodes (the per-group layout re-encodes every
        # prefix), so they are not per-target losses: off here, compared on their own below.
        loss=LossConfig(balance_loss_weight=0.0, z_loss_weight=0.0),
    )
    return ExperimentConfig(data=DataConfig(next_window=1), model=model, train=train)


@pytest.fixture(scope="module")
def data(ml100k: MovieLens) -> SplitData:
    return from_movielens(ml100k, _config().data)


def _short_chunks(ds: TabularDataset, count: int) -> np.ndarray:
    """Chunks that hold a whole user's train sequence of at most 51 items: every row's history is its prefix."""
    history = ds.features["history"]
    lengths = np.diff(history.offsets)[ds.group_offsets[:-1]]
    assert ds.target_start is not None
    fits = (lengths <= 51) & (ds.target_start == 1)
    return np.flatnonzero(fits)[:count]


def _per_group_twin(generative: TabularDataset, reference: TabularDataset, chunks: np.ndarray) -> np.ndarray:
    """The reference's groups holding the same input rows as ``chunks``."""
    rows = generative.rows_of_groups(chunks)
    stored = np.empty(len(reference), dtype=np.int64)
    stored[reference.input_row] = np.arange(len(reference))
    their_rows = stored[generative.input_row[rows]]
    groups = np.searchsorted(reference.group_offsets, their_rows, side="right") - 1
    return np.unique(groups)


def test_one_pass_per_user_equals_the_per_prefix_passes(data: SplitData) -> None:
    cfg = _config()
    gen = apply_layout(data, cfg)
    ds_gen, ds_ref = gen.splits["train"], data.splits["train"]
    chunks = _short_chunks(ds_gen, 6)
    assert len(chunks) == 6
    groups = _per_group_twin(ds_gen, ds_ref, chunks)
    num_items = data.schema.next_items_table().num_embeddings  # type: ignore[union-attr]
    candidates = full_catalogue(num_items).numpy()
    batch_gen = ds_gen.batch_of_groups(chunks, candidates)
    batch_ref = ds_ref.batch_of_groups(groups, candidates)
    assert batch_gen.batch_size == batch_ref.batch_size  # the same rows, grouped differently
    assert batch_gen.num_groups == 6 < batch_ref.num_groups

    torch.manual_seed(0)
    module = build_train_module(cfg, data.schema, sparse_device=torch.device("cpu"), optimizers=False)
    module.train()
    results = []
    for batch, ds, rows in (
        (batch_gen, ds_gen, ds_gen.rows_of_groups(chunks)),
        (batch_ref, ds_ref, ds_ref.rows_of_groups(groups)),
    ):
        module.zero_grad()
        loss, step = module(batch)
        loss.backward()
        order = np.argsort(ds.input_row[rows])  # rows by input row: the same order for both layouts
        preds = torch.stack([step.model.predictions[t.name] for t in data.tasks], dim=1)[order]
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), step.loss, preds, grads))
    (loss_g, parts_g, pred_g, grad_g), (loss_r, parts_r, pred_r, grad_r) = results
    torch.testing.assert_close(pred_g, pred_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts_g.per_task, parts_r.per_task, atol=1e-5, rtol=0)  # each task over its rows
    torch.testing.assert_close(parts_g.next_items, parts_r.next_items, atol=1e-5, rtol=0)  # one positive per target
    torch.testing.assert_close(loss_g, loss_r, atol=1e-5, rtol=0)
    # The generative pass encodes each token once: its balance loss is measured on fewer tokens, but it is a loss.
    assert torch.isfinite(parts_g.balance_loss) and parts_g.balance_loss > 0
    assert grad_g.keys() == grad_r.keys() and len(grad_g) > 10
    for name in grad_g:
        torch.testing.assert_close(grad_g[name], grad_r[name], atol=1e-5, rtol=1e-4, msg=name)


def test_every_row_is_kept_and_reads_its_own_history(data: SplitData) -> None:
    gen = apply_layout(data, _config())
    for split, ds in data.splits.items():
        g = gen.splits[split]
        assert sorted(g.input_row.tolist()) == sorted(ds.input_row.tolist())  # nothing dropped, nothing added
        # The labels travel with their rows.
        ref = np.empty_like(ds.labels)
        ref[ds.input_row] = ds.labels
        np.testing.assert_array_equal(np.nan_to_num(g.labels), np.nan_to_num(ref[g.input_row]))
        report = gen.split_info[split]["generative"]
        assert report["rows"] == len(ds) and report["chunks"] == g.num_groups
        assert report["chunks_without_rows"] == 0
    # Each row's token sees, as its last W items, exactly the row's per-group history window.
    g, ds = gen.splits["valid"], data.splits["valid"]
    stored = np.empty(len(ds), dtype=np.int64)
    stored[ds.input_row] = np.arange(len(ds))
    hist_g, hist_r = g.features["history"], ds.features["history"]
    assert g.position_index is not None
    for group in range(0, g.num_groups, 97):
        lead = g.group_offsets[group]
        chunk = hist_g.values[hist_g.offsets[lead] : hist_g.offsets[lead + 1]]
        for row in range(g.group_offsets[group], g.group_offsets[group + 1]):
            r = stored[g.input_row[row]]
            window = hist_r.values[hist_r.offsets[r] : hist_r.offsets[r + 1]]
            seen = chunk[: g.position_index[row]]  # token p - s: the items before the target
            np.testing.assert_array_equal(seen[-len(window) :], window)


def test_long_users_are_chunked_with_every_target_owned_once(data: SplitData) -> None:
    cfg = dataclasses.replace(_config(), data=dataclasses.replace(_config().data, chunk_length=200))
    gen = apply_layout(data, cfg)
    ds = gen.splits["train"]
    report = gen.split_info["train"]["generative"]
    assert report["users_chunked"] > 0 and report["chunks"] > report["users"]
    assert ds.position_index is not None and ds.target_start is not None
    context = cfg.model.encoder.receptive_field(cfg.data.max_history)
    lengths = np.diff(ds.features["history"].offsets)[ds.group_offsets[:-1]]
    assert (lengths <= 200).all()
    # Owned targets of each chunk: positions target_start .. length - 1; summed over chunks, each target once.
    assert int((lengths - ds.target_start).sum()) == report["targets"] == int(data.split_info["train"]["positives"])
    # Each chunk holds the receptive field as context before its first target, or starts at the user's first item.
    ref = data.splits["train"]
    stored = np.empty(len(ref), dtype=np.int64)
    stored[ref.input_row] = np.arange(len(ref))
    position = data.positions["train"][stored[ds.input_row]]  # each row's target position in its user's sequence
    group = np.searchsorted(ds.group_offsets, np.arange(len(ds)), side="right") - 1
    start = (position - ds.position_index)[ds.group_offsets[:-1]]  # first item of each chunk
    assert (start > 0).any()
    assert ((ds.target_start == context) | (start == 0)).all()
    # Rows read tokens the chunk owns.
    assert (ds.position_index >= ds.target_start[group]).all() and (ds.position_index <= lengths[group]).all()
