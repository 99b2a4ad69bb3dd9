"""The causal encoder: one pass equals the prefix passes, no look-ahead, chunks equal the whole pass, no NaN."""

from __future__ import annotations

import pytest
import torch

from supermoe_rec.config.experiment import Arch, EncoderConfig, ModelConfig, MoEConfig
from supermoe_rec.modules.causal import (
    CausalMoEEncoder,
    band_mask,
    local_attention,
    reference_band_attention,
)
from supermoe_rec.modules.transformer import AttentionImpl

W = 3  # a window shorter than the sequences, so the band matters


def _encoder(arch: Arch, use_task_tokens: bool = True, dropout: float = 0.0, seed: int = 0) -> CausalMoEEncoder:
    torch.manual_seed(seed)
    # Dropless routing: a token's experts and weights depend on the token alone, not on how many share the batch.
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, moe_every=1, dropless=True, num_shared_experts=1)
    enc_cfg = EncoderConfig(
        d_model=16, num_layers=2, num_heads=2, ffn_hidden=32, use_task_tokens=use_task_tokens, dropout=dropout
    )
    enc = CausalMoEEncoder(ModelConfig(arch=arch, encoder=enc_cfg, moe=moe), num_tasks=3, input_dim=8, max_history=W)
    with torch.no_grad():  # non-zero relative biases, so a wrong distance or a missed [START] bias shows
        for p in enc.parameters():
            if p.dim() <= 2 and p.shape[-1] in (W, 2) and p.abs().sum() == 0:
                p.normal_()
    return enc


CASES = [(arch, tasks) for arch in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER) for tasks in (True, False)]


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(3, 7, 8, generator=g)  # jagged: 7, 4 and 0 items
    lengths = torch.tensor([7, 4, 0])
    history[1, 4:] = float("nan")  # garbage in padding must not reach a real token
    return history, lengths, torch.randn(3, 16, generator=g)


@pytest.mark.parametrize(("arch", "tasks"), CASES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_one_pass_equals_every_prefix_pass(arch: Arch, tasks: bool, train_mode: bool) -> None:
    enc = _encoder(arch, tasks)
    enc.train(train_mode)  # dropout 0: train and eval mode must both hold the prefix property
    history, lengths, context = _batch()
    out = enc(history, lengths, context)
    assert torch.isfinite(out.states).all() and torch.isfinite(out.tasks).all()
    for g in range(3):
        for s in range(int(lengths[g]) + 1):  # token s: after s items
            prefix = enc(history[g : g + 1, :s], torch.tensor([s]), context[g : g + 1])
            torch.testing.assert_close(prefix.states[0, s], out.states[g, s], atol=1e-5, rtol=0)
            torch.testing.assert_close(prefix.tasks[0, s], out.tasks[g, s], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "tasks"), CASES)
def test_no_look_ahead(arch: Arch, tasks: bool) -> None:
    enc = _encoder(arch, tasks).eval()
    history, lengths, context = _batch()
    before = enc(history, lengths, context)
    for t in range(7):
        changed = history.clone()
        changed[0, t] += 10.0  # item t sits on token t + 1
        after = enc(changed, lengths, context)
        torch.testing.assert_close(after.states[0, : t + 1], before.states[0, : t + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(after.tasks[0, : t + 1], before.tasks[0, : t + 1], atol=1e-6, rtol=0)
        assert (after.states[0, t + 1] - before.states[0, t + 1]).abs().max() > 1e-3  # it does see its own item


def test_task_readouts_depend_on_the_task() -> None:
    enc = _encoder(Arch.SUPERMOE).eval()
    out = enc(*_batch())
    assert (out.tasks[:, :, 0] - out.tasks[:, :, 1]).abs().max() > 1e-3
    no_tasks = _encoder(Arch.SUPERMOE, use_task_tokens=False).eval()
    plain = no_tasks(*_batch())
    torch.testing.assert_close(plain.tasks[:, :, 0], plain.states)  # without readouts every task reads the state


def test_a_chunk_with_the_receptive_field_as_context_equals_the_whole_pass() -> None:
    enc = _encoder(Arch.SUPERMOE).eval()
    torch.manual_seed(3)
    seq = torch.randn(1, 20, 8)
    whole = enc(seq, torch.tensor([20]))
    # Token p sits on item p - 1 and sees the receptive_field items p - rf .. p - 1: that many items of context.
    context = enc.receptive_field
    assert context == 3 * (W - 1) + 1
    a, b = 12, 20  # owned targets: positions 12..19, read at tokens p - s
    s = a - context
    chunk = enc(seq[:, s:b], torch.tensor([b - s]))
    for p in range(a, b):
        torch.testing.assert_close(chunk.states[0, p - s], whole.states[0, p], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunk.tasks[0, p - s], whole.tasks[0, p], atol=1e-5, rtol=0)
    short = enc(seq[:, s + 1 : b], torch.tensor([b - s - 1]))  # one item less context: the first target differs
    assert (short.tasks[0, a - s - 1] - whole.tasks[0, a]).abs().max() > 1e-4


@pytest.mark.parametrize("length", [2, 3, 7, 11])  # shorter than, equal to and longer than the window
def test_blocked_local_attention_equals_the_full_band_mask(length: int) -> None:
    g = torch.Generator().manual_seed(length)
    H, Q = 2, 3
    q = torch.randn(2, H, (1 + length) * Q, 4, generator=g)
    k, v = torch.randn(2, 2, H, 1 + length, 4, generator=g)
    start, dist = torch.randn(H, generator=g), torch.randn(H, W, generator=g)
    fast = local_attention(q, k, v, W, start, dist, queries_per_token=Q)
    ref = reference_band_attention(q, k, v, W, start, dist, queries_per_token=Q)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_sdpa_and_reference_attention_agree_in_the_encoder() -> None:
    enc = _encoder(Arch.SUPERMOE).eval()
    history, lengths, context = _batch()
    fast = enc(history, lengths, context)
    for block in enc.blocks:
        block.attn.impl = AttentionImpl.REFERENCE  # type: ignore[union-attr]
    assert enc.readout is not None
    enc.readout.impl = AttentionImpl.REFERENCE
    ref = enc(history, lengths, context)
    torch.testing.assert_close(fast.states, ref.states, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.tasks, ref.tasks, atol=1e-5, rtol=0)


def test_band_mask_rows_are_never_empty() -> None:
    mask = band_mask(6, window=2, start_bias=torch.zeros(2), distance_bias=torch.zeros(2, 2))
    assert torch.isfinite(mask).any(dim=-1).all()  # every query keeps [START]
    allowed = torch.isfinite(mask[0, 0])
    # token 4 sees [START], and items on tokens 3 and 4 (distance 0 and 1): the last W = 2 items
    assert allowed[4].nonzero().squeeze(1).tolist() == [0, 3, 4]


def test_gradients_flow_to_every_parameter() -> None:
    enc = _encoder(Arch.SUPERMOE)
    history, lengths, context = _batch()
    history = history.nan_to_num()
    out = enc(history, lengths, context)
    (out.tasks.sum() + out.states.sum() + out.balance_loss).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
