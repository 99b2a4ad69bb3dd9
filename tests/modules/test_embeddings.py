"""SparseArch: the EC and bags-of-one sequence lookups agree (values and gradients); shared tables; meta builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from supermoe_rec.config.experiment import SequenceLookup
from supermoe_rec.data.splits import SplitData
from supermoe_rec.modules.embeddings import SparseArch, bags_of_one, resolve_sequence_lookup
from supermoe_rec.modules.padding import pad_rows


def _pair(data: SplitData) -> tuple[SparseArch, SparseArch]:
    torch.manual_seed(0)
    ec = SparseArch(data.schema, 8, SequenceLookup.EMBEDDING_COLLECTION)
    bags = SparseArch(data.schema, 8, SequenceLookup.BAGS_OF_ONE)
    assert ec.sequence_ec is not None and bags.sequence_ebc is not None and ec.ebc is not None
    bags.load_state_dict(
        {k.replace("sequence_ec.embeddings", "sequence_ebc.embedding_bags"): v for k, v in ec.state_dict().items()}
    )
    return ec, bags


def test_ec_and_bags_of_one_agree_on_ml100k(ml100k_data: SplitData) -> None:
    ec, bags = _pair(ml100k_data)
    batch = ml100k_data.splits["train"].batch_of_groups(np.arange(40))
    out_ec = ec(batch.sparse_features, batch.sequence_features)
    out_bags = bags(batch.sparse_features, batch.sequence_features)
    assert out_ec.sequences.keys() == out_bags.sequences.keys() == {"history", "target_item"}
    for name in out_ec.sequences:
        torch.testing.assert_close(out_ec.sequences[name], out_bags.sequences[name], rtol=0, atol=0)
        assert torch.equal(out_ec.lengths[name], out_bags.lengths[name])
    # padding positions are exactly zero; non-leader rows have empty histories
    lengths = out_ec.lengths["history"]
    assert (lengths[1::2] == 0).all()
    width = out_ec.sequences["history"].shape[1]
    pad = torch.arange(width)[None, :] >= lengths[:, None]
    assert (out_ec.sequences["history"][pad] == 0).all()

    def grads(arch: SparseArch, table_param: str) -> torch.Tensor:
        out = arch(batch.sparse_features, batch.sequence_features)
        weights = torch.linspace(-1, 1, out.sequences["history"].shape[1])[None, :, None]
        loss = (out.sequences["history"] * weights).sum() + 3 * out.sequences["target_item"].sum()
        loss.backward()
        grad = dict(arch.named_parameters())[table_param].grad
        assert grad is not None
        return grad

    g_ec = grads(ec, "sequence_ec.embeddings.item.weight")
    g_bags = grads(bags, "sequence_ebc.embedding_bags.item.weight")
    torch.testing.assert_close(g_ec, g_bags, rtol=1e-6, atol=1e-6)


def test_history_and_target_share_the_item_table(ml100k_data: SplitData) -> None:
    ec, _ = _pair(ml100k_data)
    assert ec.sequence_ec is not None
    assert list(ec.sequence_ec.embeddings.keys()) == ["item"]
    batch = ml100k_data.splits["valid"].batch_of_groups(np.arange(4))
    out = ec(batch.sparse_features, batch.sequence_features)
    table = ec.sequence_ec.embeddings["item"].weight
    target_ids = batch.sequence_features["target_item"].values()
    torch.testing.assert_close(out.sequences["target_item"][:, 0], table[target_ids])
    first_history = batch.sequence_features["history"].values()[: int(out.lengths["history"][0])]
    torch.testing.assert_close(out.sequences["history"][0, : len(first_history)], table[first_history])


def test_bags_of_one_layout() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["h", "t"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 3, 1, 1, 1, 1])
    )
    out = bags_of_one(kjt)
    # Three rows: h holds 0 + 3 + 1 ids, t 1 + 1 + 1. Compact: one bag per id, stride = the most ids of any key
    # (4), not rows x the padded width (3 x 3 + 3 x 1 bags before).
    assert out.stride() == 4
    assert out["h"].lengths().tolist() == [1, 1, 1, 1]
    assert out["t"].lengths().tolist() == [1, 1, 1, 0]
    assert torch.equal(out.values(), kjt.values())


def test_pad_rows_pads_only_the_chosen_rows() -> None:
    values = torch.arange(1.0, 7.0).view(6, 1)  # rows of lengths 0, 3, 1, 2
    lengths = torch.tensor([0, 3, 1, 2])
    out = pad_rows(values, lengths, torch.tensor([3, 0, 1]))
    assert out[..., 0].tolist() == [[5.0, 6.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    assert pad_rows(values, lengths, torch.tensor([2])).shape == (1, 1, 1)  # the chosen rows' width


@pytest.mark.parametrize("lookup", [SequenceLookup.EMBEDDING_COLLECTION, SequenceLookup.BAGS_OF_ONE])
def test_builds_on_meta(ml100k_data: SplitData, lookup: SequenceLookup) -> None:
    arch = SparseArch(ml100k_data.schema, 16, lookup, device=torch.device("meta"))
    assert all(p.is_meta for p in arch.parameters())
    rows = sum(p.shape[0] for p in arch.parameters())
    assert rows == sum(t.num_embeddings for t in ml100k_data.schema.tables)


def test_auto_lookup_per_device() -> None:
    assert resolve_sequence_lookup(SequenceLookup.AUTO, torch.device("cpu")) is SequenceLookup.BAGS_OF_ONE
    assert resolve_sequence_lookup(SequenceLookup.AUTO, torch.device("cuda")) is SequenceLookup.EMBEDDING_COLLECTION
    assert resolve_sequence_lookup(SequenceLookup.EMBEDDING_COLLECTION, None) is SequenceLookup.EMBEDDING_COLLECTION
