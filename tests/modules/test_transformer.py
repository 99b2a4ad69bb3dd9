"""MoETransformerEncoder: shapes, padding invariance, empty and truncated histories, SDPA vs reference attention,
context and task tokens, real-token-only MoE statistics, dense ablation widths, meta build, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from supermoe_rec.config.experiment import Arch, EncoderConfig, ModelConfig, MoEConfig
from supermoe_rec.models.factory import count_parameters
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer
from supermoe_rec.modules.transformer import AttentionImpl, EncoderOutput, MoETransformerEncoder

D, IN, T, E, K = 16, 8, 3, 4, 2


def _cfg(moe_overrides: dict[str, object] | None = None, use_moe: bool = True, **overrides: object) -> ModelConfig:
    """``overrides`` are encoder fields; ``use_moe=False`` is the dense_transformer arch."""
    moe = dataclasses.replace(
        MoEConfig(num_experts=E, top_k=K, expert_hidden=8, moe_every=1),
        **(moe_overrides or {}),  # type: ignore[arg-type]
    )
    encoder = dataclasses.replace(
        EncoderConfig(d_model=D, num_layers=2, num_heads=2, ffn_hidden=32),
        **overrides,  # type: ignore[arg-type]
    )
    arch = Arch.SUPERMOE if use_moe else Arch.DENSE_TRANSFORMER
    return ModelConfig(arch=arch, encoder=encoder, moe=moe)


def _encoder(cfg: ModelConfig | None = None, seed: int = 0, **kwargs: object) -> MoETransformerEncoder:
    torch.manual_seed(seed)
    return MoETransformerEncoder(cfg or _cfg(), num_tasks=T, input_dim=IN, **kwargs)  # type: ignore[arg-type]


def _batch(lengths: list[int], L: int | None = None, seed: int = 1, pad: float = 0.0) -> tuple[Tensor, Tensor]:
    """Left-aligned histories ``[G, L, IN]`` with ``pad`` at padding positions, and their lengths."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths, default=0) if L is None else L
    history = torch.randn(len(lengths), L, IN, generator=g)
    lens = torch.tensor(lengths, dtype=torch.long)
    history[torch.arange(L) >= lens.unsqueeze(1)] = pad
    return history, lens


def _reps(out: EncoderOutput) -> Tensor:
    return torch.cat([out.user.unsqueeze(1), out.tasks], dim=1)  # (G, 1+T, D)


@pytest.mark.parametrize("use_task_tokens", [True, False])
@pytest.mark.parametrize("use_moe", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("moe_every", [1, 2])
def test_shapes(use_task_tokens: bool, use_moe: bool, num_layers: int, moe_every: int) -> None:
    cfg = _cfg({"moe_every": moe_every}, use_task_tokens=use_task_tokens, use_moe=use_moe, num_layers=num_layers)
    enc = _encoder(cfg)
    history, lengths = _batch([5, 0, 2, 7])
    out = enc(history, lengths)
    m = sum((i + 1) % moe_every == 0 for i in range(num_layers)) if use_moe else 0
    assert len(enc.moe_layers) == m
    assert out.user.shape == (4, D) and out.tasks.shape == (4, T, D)
    assert out.balance_loss.shape == out.z_loss.shape == out.dropped_fraction.shape == ()
    assert out.tokens_per_expert.shape == (m, E) and out.task_expert_counts.shape == (m, T + 2, E)
    assert torch.isfinite(_reps(out)).all()
    if not use_task_tokens:
        assert torch.equal(out.tasks, out.user.unsqueeze(1).expand(4, T, D))
    if m == 0:
        assert out.balance_loss.item() == out.z_loss.item() == out.dropped_fraction.item() == 0.0


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    extra_pad=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_padding_invariance(lengths: list[int], extra_pad: int, seed: int) -> None:
    """A sequence's outputs equal its outputs encoded alone, whatever the padding and the other rows hold.

    The MoE is dropless here: with a capacity, which tokens get dropped depends on the whole batch (by design), so
    outputs could then legitimately differ. Padding holds NaN to prove it never leaks.
    """
    enc = _encoder(_cfg({"dropless": True})).eval()
    history, lens = _batch(lengths, L=max(lengths) + extra_pad, seed=seed, pad=float("nan"))
    with torch.no_grad():
        batched = _reps(enc(history, lens))
        for g, n in enumerate(lengths):
            alone = _reps(enc(history[g : g + 1, :n], lens[g : g + 1]))
            torch.testing.assert_close(batched[g : g + 1], alone, atol=1e-5, rtol=0)


def test_padding_invariance_in_training_mode_dropless() -> None:
    enc = _encoder(_cfg({"dropless": True})).train()
    history, lens = _batch([6, 1, 3], L=9, pad=1e6)
    batched = _reps(enc(history, lens))
    alone = _reps(enc(history[:1, :6], lens[:1]))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_empty_history() -> None:
    enc = _encoder(_cfg({"dropless": True}))  # dropless: row-to-row comparisons must not depend on capacity drops
    # All lengths 0 with garbage columns; L = 0; and a mix.
    h_pad, l_pad = _batch([0, 0], L=4, pad=float("nan"))
    h_none = torch.zeros(2, 0, IN)
    out_pad, out_none = enc(h_pad, l_pad), enc(h_none, l_pad)
    for out in (out_pad, out_none):
        assert torch.isfinite(_reps(out)).all()
        assert out.task_expert_counts[:, T + 1].sum() == 0  # no history token reached the MoE
    torch.testing.assert_close(_reps(out_pad), _reps(out_none), atol=1e-6, rtol=0)
    # Two empty rows encode identically (only the special tokens attend to each other).
    torch.testing.assert_close(out_none.user[0], out_none.user[1], atol=0, rtol=0)
    mixed_h, mixed_l = _batch([0, 3])
    out = enc(mixed_h, mixed_l)
    torch.testing.assert_close(out.user[0], out_none.user[0], atol=1e-5, rtol=0)
    out.user.sum().backward()
    assert enc.user_token.grad is not None and torch.isfinite(enc.user_token.grad).all()


def test_truncation_keeps_most_recent_items() -> None:
    enc = _encoder(max_history=4).eval()
    lengths = [7, 3, 5, 4]
    history, lens = _batch(lengths, L=8)
    with torch.no_grad():
        out = _reps(enc(history, lens))
        for g, n in enumerate(lengths):
            start = max(n - 4, 0)
            alone = _reps(enc(history[g : g + 1, start:n], torch.tensor([n - start])))
            torch.testing.assert_close(out[g : g + 1], alone, atol=1e-5, rtol=0)
        # Changing the dropped (oldest) items changes nothing; changing a kept one does.
        changed = history.clone()
        changed[0, :3] = 100.0
        torch.testing.assert_close(_reps(enc(changed, lens)), out, atol=0, rtol=0)
        changed[0, 3] = 100.0
        assert not torch.allclose(_reps(enc(changed, lens))[0], out[0], atol=1e-3)


def test_right_aligned_positions_and_zeroed_padding() -> None:
    """Block 0 input: history item j of row g is proj(item) + positions[len_g - 1 - j]; padding is exactly 0."""
    enc = _encoder()
    seen: list[Tensor] = []
    enc.blocks[0].attn_norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    lengths = [4, 1, 2]
    history, lens = _batch(lengths, pad=float("nan"))
    context = torch.randn(3, D)
    enc(history, lens, context)
    x = seen[0]  # (G, S, D)
    assert x.shape == (3, 1 + T + 4, D)
    assert enc.input_proj is not None
    with torch.no_grad():
        for g, n in enumerate(lengths):
            torch.testing.assert_close(x[g, 0], enc.user_token + context[g])
            torch.testing.assert_close(x[g, 1 : 1 + T], enc.task_tokens + context[g])
            for j in range(n):
                expected = enc.input_proj(history[g, j]) + enc.positions[n - 1 - j]
                torch.testing.assert_close(x[g, 1 + T + j], expected)
            assert x[g, 1 + T + n :].eq(0).all()


def _forward_backward(
    enc: MoETransformerEncoder, history: Tensor, lengths: Tensor, context: Tensor, r: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    enc.zero_grad(set_to_none=True)
    history = history.clone().requires_grad_(True)
    context = context.clone().requires_grad_(True)
    out = enc(history, lengths, context)
    reps = _reps(out)
    (reps * r).sum().backward()
    grads = {name: p.grad.clone() for name, p in enc.named_parameters() if p.grad is not None}
    assert history.grad is not None and context.grad is not None
    grads["history"], grads["context"] = history.grad, context.grad
    return reps.detach(), grads


@pytest.mark.parametrize("use_moe", [True, False])
def test_sdpa_matches_reference_attention(use_moe: bool) -> None:
    cfg = _cfg(use_moe=use_moe, num_layers=3)
    sdpa = _encoder(cfg)
    ref = _encoder(cfg, seed=1, attention_impl=AttentionImpl.REFERENCE, expert_impl=ExpertImpl.REFERENCE)
    ref.load_state_dict(sdpa.state_dict())
    history, lengths = _batch([6, 0, 2, 9], L=10)
    context, r = torch.randn(4, D), torch.randn(4, 1 + T, D)
    out_s, grads_s = _forward_backward(sdpa, history, lengths, context, r)
    out_r, grads_r = _forward_backward(ref, history, lengths, context, r)
    torch.testing.assert_close(out_s, out_r, atol=1e-5, rtol=0)
    assert grads_s.keys() == grads_r.keys()
    # Every parameter is in the graph (unused position rows get zero gradients, not None).
    assert set(grads_s) == {name for name, _ in sdpa.named_parameters()} | {"history", "context"}
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_r[name], atol=1e-5, rtol=0, msg=name)


def test_context_and_task_tokens() -> None:
    enc = _encoder().eval()
    history, lengths = _batch([3, 5])
    with torch.no_grad():
        base = enc(history, lengths)
        zero_ctx = enc(history, lengths, torch.zeros(2, D))
        ctx = torch.zeros(2, D)
        ctx[1] = torch.randn(D)
        with_ctx = enc(history, lengths, ctx)
    torch.testing.assert_close(_reps(base), _reps(zero_ctx), atol=0, rtol=0)
    # Context is per row: row 0 (zero context) is unchanged, row 1 changes at [USER] and every task token.
    torch.testing.assert_close(_reps(with_ctx)[0], _reps(base)[0], atol=0, rtol=0)
    assert (_reps(with_ctx)[1] - _reps(base)[1]).abs().amax(dim=-1).min() > 1e-3
    # Each task gets its own representation, different from the user's.
    reps = _reps(base)
    for a in range(1 + T):
        for b in range(a + 1, 1 + T):
            assert (reps[:, a] - reps[:, b]).abs().amax() > 1e-3


def test_context_shape_and_length_validation() -> None:
    enc = _encoder()
    history, lengths = _batch([3, 5])
    with pytest.raises(ValueError, match="context"):
        enc(history, lengths, torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="lengths"):
        enc(history, torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="lengths"):
        enc(history, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="history"):
        enc(torch.zeros(2, 5, IN + 1), lengths)
    with pytest.raises(ValueError, match="num_heads"):
        _encoder(_cfg(num_heads=3))


@pytest.mark.parametrize("use_task_tokens", [True, False])
def test_moe_sees_only_real_tokens(use_task_tokens: bool) -> None:
    cfg = _cfg(use_task_tokens=use_task_tokens, num_layers=3)  # capacity drops allowed: counts are pre-drop
    enc = _encoder(cfg, max_history=6)
    shapes: list[tuple[int, ...]] = []
    for layer in enc.moe_layers:
        layer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    lengths = [7, 0, 2, 5, 1]  # 7 is truncated to 6
    history, lens = _batch(lengths, L=11, pad=float("nan"))
    out = enc(history, lens)
    G, tp, hist = len(lengths), (T if use_task_tokens else 0), sum(min(n, 6) for n in lengths)
    n_real = G * (1 + tp) + hist
    assert shapes == [(n_real, D)] * 3
    assert out.tokens_per_expert.sum(dim=1).tolist() == [n_real * K] * 3
    assert torch.equal(out.task_expert_counts.sum(dim=2), out.task_expert_counts.sum(dim=2)[:1].expand(3, -1))
    rows = out.task_expert_counts[0].sum(dim=1).tolist()  # (T+2,)
    assert rows == [G * K] + [G * K if use_task_tokens else 0] * T + [hist * K]
    assert torch.equal(out.task_expert_counts.sum(dim=1), out.tokens_per_expert)


def test_dense_hidden_for_moe_blocks() -> None:
    cfg = _cfg({"moe_every": 2}, use_moe=False, num_layers=4)
    enc = _encoder(cfg, dense_hidden_for_moe_blocks=K * 8)
    ffns = [b.ffn for b in enc.blocks]
    assert all(isinstance(f, DenseFFN) for f in ffns)
    assert [f.hidden for f in ffns] == [32, 16, 32, 16]
    counts = count_parameters(enc, top_k=K)
    assert counts["dense_active"] == counts["total"] and counts["experts"] == 0
    out = enc(*_batch([2, 3]))
    assert out.tokens_per_expert.shape == (0, E) and out.task_expert_counts.shape == (0, T + 2, E)
    # Without the argument every dense block has ffn_hidden; with arch supermoe the MoE blocks stay MoE.
    assert [b.ffn.hidden for b in _encoder(cfg).blocks] == [32] * 4
    moe_enc = _encoder(dataclasses.replace(cfg, arch=Arch.SUPERMOE), dense_hidden_for_moe_blocks=16)
    assert [type(b.ffn) for b in moe_enc.blocks] == [DenseFFN, MoELayer, DenseFFN, MoELayer]


def test_active_parameters_per_token() -> None:
    enc = _encoder(_cfg({"moe_every": 2}, num_layers=4))
    per_expert = D * 8 + 8 + 8 * D + D
    counts = count_parameters(enc, top_k=K)
    assert counts["total"] == counts["dense"] == sum(p.numel() for p in enc.parameters())
    assert counts["experts"] == 2 * E * per_expert
    assert counts["dense_active"] == counts["total"] - 2 * (E - K) * per_expert


def test_input_dim_equal_to_d_model_has_no_projection() -> None:
    torch.manual_seed(0)
    enc = MoETransformerEncoder(_cfg(), num_tasks=T, input_dim=D)
    assert enc.input_proj is None
    assert enc(torch.randn(2, 3, D), torch.tensor([3, 1])).user.shape == (2, D)


def test_meta_build_materialises() -> None:
    cfg = _cfg({"moe_every": 2}, num_layers=3)
    meta = MoETransformerEncoder(cfg, num_tasks=T, input_dim=IN, device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device=torch.device("cpu"))
    torch.manual_seed(0)
    meta.reset_parameters()
    cpu = _encoder(cfg)
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in cpu.named_parameters()}
    # reset_parameters re-initialises every tensor, so to_empty's uninitialised memory never survives.
    other = MoETransformerEncoder(cfg, num_tasks=T, input_dim=IN, device=torch.device("meta"))
    other.to_empty(device=torch.device("cpu"))
    torch.manual_seed(0)
    other.reset_parameters()
    for (name, a), b in zip(meta.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for p in (meta.user_token, meta.task_tokens, meta.positions):
        assert abs(p.std().item() - 0.02) < 0.01
    out = meta(*_batch([4, 0, 2]))
    assert torch.isfinite(_reps(out)).all()


def test_seeded_determinism() -> None:
    a, b = _encoder(seed=3), _encoder(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=name)
    assert not torch.equal(_encoder(seed=4).user_token, a.user_token)
    batch = _batch([5, 1, 3])
    out_a, out_b = a(*batch), b(*batch)
    for x, y in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_dropout_only_in_training() -> None:
    enc = _encoder(_cfg(dropout=0.2))
    batch = _batch([5, 2])
    torch.manual_seed(0)
    first = _reps(enc(*batch))
    second = _reps(enc(*batch))
    assert not torch.allclose(first, second)
    enc.eval()
    torch.testing.assert_close(_reps(enc(*batch)), _reps(enc(*batch)), atol=0, rtol=0)


def test_runs_under_bf16_autocast() -> None:
    # The FFN's output comes back in bf16 under autocast while the residual stream is fp32.
    from supermoe_rec.config.experiment import ModelConfig, MoEConfig
    from supermoe_rec.modules.transformer import MoETransformerEncoder

    torch.manual_seed(0)
    encoder = EncoderConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=32)
    cfg = ModelConfig(encoder=encoder, moe=MoEConfig(num_experts=2, moe_every=1))
    encoder = MoETransformerEncoder(cfg, num_tasks=2, input_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(torch.randn(3, 4, 16), torch.tensor([4, 0, 2]))
    assert out.tasks.shape == (3, 2, 16)
    assert torch.isfinite(out.user.float()).all()
