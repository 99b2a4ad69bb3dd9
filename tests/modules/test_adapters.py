"""encode_jagged / jagged_to_padded: a TorchRec JaggedTensor history gives exactly the padded-tensor encoder output,
gradients included, also straight from an EmbeddingCollection and with empty rows or an all-empty batch."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from supermoe_rec import EncoderOutput, MoETransformerEncoder, encode_jagged, jagged_to_padded
from supermoe_rec.config.experiment import EncoderConfig, ModelConfig, MoEConfig

IN, D, T = 8, 16, 3


def _encoder() -> MoETransformerEncoder:
    torch.manual_seed(0)
    encoder = EncoderConfig(d_model=D, num_layers=2, num_heads=2, ffn_hidden=32)
    cfg = ModelConfig(encoder=encoder, moe=MoEConfig(num_experts=4, moe_every=1))
    return MoETransformerEncoder(cfg, num_tasks=T, input_dim=IN, max_history=6)


def _assert_same(a: EncoderOutput, b: EncoderOutput) -> None:
    for name, x, y in zip(EncoderOutput._fields, a, b, strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("lengths", [[3, 0, 5, 1], [0, 0], [9, 2], [1]])
def test_encode_jagged_equals_padded(lengths: list[int]) -> None:
    enc = _encoder()
    g = torch.Generator().manual_seed(1)
    values = torch.randn(sum(lengths), IN, generator=g)
    lens = torch.tensor(lengths)
    context = torch.randn(len(lengths), D, generator=g)
    L = max(lengths)
    padded = torch.zeros(len(lengths), L, IN)
    offset = 0
    for row, n in enumerate(lengths):
        padded[row, :n] = values[offset : offset + n]
        offset += n

    got_padded, got_lengths = jagged_to_padded(JaggedTensor(values=values, lengths=lens))
    assert torch.equal(got_padded, padded) and got_lengths.tolist() == lengths
    _assert_same(encode_jagged(enc, JaggedTensor(values=values, lengths=lens), context), enc(padded, lens, context))


def test_gradients_match() -> None:
    enc = _encoder()
    lengths = [2, 0, 4]
    values = torch.randn(6, IN)
    jagged_values = values.clone().requires_grad_(True)
    encode_jagged(enc, JaggedTensor(values=jagged_values, lengths=torch.tensor(lengths))).user.sum().backward()
    grads_jagged = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()

    dense_values = values.clone().requires_grad_(True)
    padded = torch.zeros(3, 4, IN)
    padded[0, :2], padded[2, :4] = dense_values[:2], dense_values[2:]
    enc(padded, torch.tensor(lengths)).user.sum().backward()
    assert jagged_values.grad is not None and dense_values.grad is not None
    assert torch.allclose(jagged_values.grad, dense_values.grad, atol=1e-6)
    for name, p in enc.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads_jagged[name], p.grad, atol=1e-6), name


def test_from_embedding_collection() -> None:
    enc = _encoder()
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="item", embedding_dim=IN, num_embeddings=20, feature_names=["history"])]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(["history"], torch.tensor([3, 4, 5, 6, 7]), torch.tensor([3, 0, 2]))
    jt = ec(kjt)["history"]
    table = ec.embeddings["item"].weight
    padded = torch.zeros(3, 3, IN)
    padded[0], padded[2, :2] = table[[3, 4, 5]], table[[6, 7]]
    _assert_same(encode_jagged(enc, jt), enc(padded, torch.tensor([3, 0, 2])))


def test_rejects_pooled_values() -> None:
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        jagged_to_padded(JaggedTensor(values=torch.arange(3.0), lengths=torch.tensor([1, 2])))
