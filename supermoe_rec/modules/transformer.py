"""Sparse-MoE transformer encoder of a user's behaviour sequence, with a ``[USER]`` token and per-task tokens.

Dimension letters: G sequences (users), L history length, T tasks, T' task tokens (T, or 0 without task tokens),
S = 1 + T' + L tokens per sequence, M model width, Dh head dim, E experts, K top-k, N real (non-padding) tokens,
Λ MoE layers.

Token layout of sequence g (left-aligned, padding last)::

    [USER] | task_1 ... task_T | item_0 ... item_{len_g - 1} | padding ...

Token kinds, passed to the MoE layers as ``task_ids`` for routing statistics (so ``task_expert_counts`` has T + 2
rows): 0 = ``[USER]``, 1..T = task-indicator tokens, T + 1 = history items. See :func:`token_kind_labels`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.config.experiment import Arch, ModelConfig
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer, MoEOutput

__all__ = [
    "AttentionImpl",
    "EncoderBlock",
    "EncoderOutput",
    "MoETransformerEncoder",
    "MultiHeadSelfAttention",
    "block_ffn",
    "moe_slots",
    "moe_summary",
    "token_kind_labels",
]

# Std of the learned token embeddings ([USER], task tokens, positions). Measured on ml100k: N(0, 0.02) trains much
# faster than N(0, 1), which would swamp the projected item embeddings and the context at M=64.
_TOKEN_INIT_STD = 0.02


def token_kind_labels(task_names: Sequence[str]) -> list[str]:
    """Row labels of ``EncoderOutput.task_expert_counts``: ``[USER]``, the task tokens, then ``history``.

    Example::

        >>> token_kind_labels(["watch", "like"])
        ['[USER]', 'watch', 'like', 'history']
    """
    return ["[USER]", *task_names, "history"]


class AttentionImpl(str, enum.Enum):
    """Which attention kernel :class:`MultiHeadSelfAttention` runs.

    ``SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels). ``REFERENCE``: explicit
    ``softmax(Q K^T / sqrt(Dh)) V`` in plain PyTorch, kept to check the fast path.
    """

    SDPA = "sdpa"
    REFERENCE = "reference"


def _init_linear(linear: nn.Linear) -> None:
    # LeCun-normal weights, zero biases: the same init as the FFN experts, so every matmul keeps the activation
    # variance roughly constant at the small widths used here.
    nn.init.normal_(linear.weight, std=1.0 / math.sqrt(linear.in_features))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class MultiHeadSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a key-padding mask.

    Dimension letters: G sequences, S tokens per sequence, M model width, Dh = M / heads.

    No causal mask: the sequence holds only the user's past, so every token may look at every real token. Padding
    keys are masked out; padding query rows still produce (finite) values, which the caller must never read.

    Args:
        d_model: M.
        num_heads: number of heads; must divide M.
        dropout: attention-probability dropout in training (0 disables it).
        impl: :class:`AttentionImpl`; also settable later through the ``impl`` attribute.
        device: where to allocate parameters (``meta`` for deferred init).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> attn = MultiHeadSelfAttention(d_model=8, num_heads=2)
        >>> x = torch.randn(3, 5, 8)  # (G, S, M)
        >>> key_valid = torch.arange(5) < torch.tensor([[5], [3], [1]])  # (G, S)
        >>> attn(x, key_valid).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        impl: AttentionImpl = AttentionImpl.SDPA,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or d_model % num_heads != 0:
            raise ValueError(f"num_heads must be >= 1 and divide d_model={d_model}, got {num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.impl = AttentionImpl(impl)
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device)
        self.out = nn.Linear(d_model, d_model, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LeCun-normal weights, zero biases."""
        _init_linear(self.qkv)
        _init_linear(self.out)

    def _reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (G, heads, S, S)
        # Every row keeps at least one key (its special tokens, or itself under a causal mask), so no row is all
        # -inf (no NaN from softmax).
        # A bool mask keeps the True keys; a float mask adds a bias where allowed and -inf where not.
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1)  # (G, heads, S, S)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v  # (G, heads, S, Dh)

    def forward(self, x: Tensor, key_valid: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend.

        Args:
            x: ``[G, S, M]`` tokens (already normalised by the caller).
            key_valid: ``[G, S]`` bool, True for real tokens; every row needs at least one True.
            attn_mask: optional additive float mask broadcastable to ``[G, heads, S, S]`` (a bias where a query may
                attend, ``-inf`` where not) used *instead of* ``key_valid``: the causal encoder's band mask with its
                relative-position bias (:mod:`supermoe_rec.modules.causal`). Every query row needs one finite entry.

        Returns:
            ``[G, S, M]`` attention output after the output projection (no residual).
        """
        G, S, M = x.shape
        H, Dh = self.num_heads, self.head_dim
        qkv: Tensor = self.qkv(x)  # (G, S, 3D)
        q, k, v = qkv.view(G, S, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (G, H, S, Dh)
        # (G, 1, 1, S) broadcast over heads and queries, or the caller's additive mask
        mask = key_valid.view(G, 1, 1, S) if attn_mask is None else attn_mask.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if self.impl is AttentionImpl.REFERENCE:
            y = self._reference(q, k, v, mask, dropout_p)  # (G, H, S, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (G, H, S, Dh)
        y = y.transpose(1, 2).reshape(G, S, M)  # (G, S, M)
        out: Tensor = self.out(y)
        return out


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))`` on real tokens only.

    Dimension letters: G sequences, S tokens per sequence, M model width, N real tokens, E experts.

    The FFN (dense or MoE) runs on the N real tokens gathered from the ``[G, S]`` grid and is scattered back, so no
    compute is spent on padding and the MoE's routing statistics and capacity count real tokens only. Padding rows
    keep their post-attention value.

    Args:
        d_model: M.
        num_heads: attention heads.
        ffn: the FFN, a :class:`~supermoe_rec.modules.experts.DenseFFN` or a
            :class:`~supermoe_rec.modules.moe.MoELayer`, ``[N, M] -> [N, M]``.
        dropout: residual and attention dropout in training (0 disables it; dropout costs ~15% of a CPU step).
        attention_impl: :class:`AttentionImpl`.
        device: where to allocate parameters (``meta`` for deferred init).
        attention: the attention module, when not the bidirectional default (the causal encoder's band attention,
            :class:`~supermoe_rec.modules.causal.CausalSelfAttention`).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> block = EncoderBlock(8, num_heads=2, ffn=DenseFFN(8, 16))
        >>> key_valid = torch.tensor([[True, True, False], [True, False, False]])  # (G, S)
        >>> real = key_valid.reshape(-1).nonzero().squeeze(1)  # (N,)
        >>> x, moe_out = block(torch.randn(2, 3, 8), key_valid, real, torch.zeros(3, dtype=torch.long))
        >>> x.shape, moe_out is None
        (torch.Size([2, 3, 8]), True)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn: DenseFFN | MoELayer,
        dropout: float = 0.0,
        attention_impl: AttentionImpl = AttentionImpl.SDPA,
        device: torch.device | None = None,
        attention: MultiHeadSelfAttention | None = None,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(d_model, device=device)
        self.attn = attention or MultiHeadSelfAttention(d_model, num_heads, dropout, impl=attention_impl, device=device)
        self.ffn_norm = nn.LayerNorm(d_model, device=device)
        self.ffn = ffn

    def reset_parameters(self) -> None:
        """Re-initialise norms, attention and FFN."""
        self.attn_norm.reset_parameters()
        self.attn.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters()

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.dropout, training=True) if self.training and self.dropout > 0 else x

    def forward(
        self,
        x: Tensor,
        key_valid: Tensor,
        real_index: Tensor,
        token_kinds: Tensor,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, MoEOutput | None]:
        """Run the block.

        Args:
            x: ``[G, S, M]`` tokens.
            key_valid: ``[G, S]`` bool, True for real tokens.
            real_index: ``[N]`` int64 flat indices (into ``G * S``) of the real tokens.
            token_kinds: ``[N]`` int64 token kind per real token (MoE ``task_ids``; unused by a dense FFN).
            attn_mask: optional additive attention mask replacing the key-padding mask
                (:meth:`MultiHeadSelfAttention.forward`).

        Returns:
            ``(x, moe_out)``: ``[G, S, M]`` tokens and the :class:`~supermoe_rec.modules.moe.MoEOutput` (``hidden``
            ``[N, M]``) or ``None`` for a dense FFN.
        """
        G, S, M = x.shape
        x = x + self._drop(self.attn(self.attn_norm(x), key_valid, attn_mask))  # (G, S, M)
        flat = x.reshape(G * S, M)  # (G*S, M)
        h: Tensor = self.ffn_norm(flat.index_select(0, real_index))  # (N, M)
        moe_out: MoEOutput | None = None
        if isinstance(self.ffn, MoELayer):
            moe_out = self.ffn(h, task_ids=token_kinds)
            y = moe_out.hidden  # (N, M)
        else:
            y = self.ffn(h)  # (N, M)
        # Under autocast the FFN may return bf16 while the residual stream stays fp32; index_add needs one dtype.
        flat = flat.index_add(0, real_index, self._drop(y).to(flat.dtype))  # (G*S, M) padding rows unchanged
        return flat.view(G, S, M), moe_out  # (G, S, M)


def moe_slots(config: ModelConfig) -> list[bool]:
    """Which blocks are MoE slots: block i (0-based) when ``(i + 1) % moe.moe_every == 0``."""
    return [(i + 1) % config.moe.moe_every == 0 for i in range(config.encoder.num_layers)]


def block_ffn(
    config: ModelConfig,
    moe_slot: bool,
    num_kinds: int,
    dense_hidden_for_moe_blocks: int | None,
    device: torch.device | None,
    expert_impl: ExpertImpl,
) -> DenseFFN | MoELayer:
    """The FFN of a block, the same rule in both encoders: an MoE layer in an MoE slot of the ``supermoe`` arch
    (routing ``num_kinds`` token kinds); in a slot of ``dense_transformer``, a dense FFN of width
    ``dense_hidden_for_moe_blocks`` when given; otherwise a dense FFN of ``encoder.ffn_hidden``."""
    M = config.encoder.d_model
    if config.arch is Arch.SUPERMOE and moe_slot:
        return MoELayer(M, config.moe, num_tasks=num_kinds, device=device, impl=expert_impl)
    if moe_slot and dense_hidden_for_moe_blocks is not None:
        return DenseFFN(M, dense_hidden_for_moe_blocks, device=device)
    return DenseFFN(M, config.encoder.ffn_hidden, device=device)


class MoESummary(NamedTuple):
    """An encoder's MoE losses and statistics over its Λ MoE layers (zeros and empty tensors when Λ = 0).

    Attributes:
        balance_loss, z_loss: scalar float32 means over the layers (unweighted).
        tokens_per_expert: ``[Λ, E]`` int64 assignments per expert before dropping.
        dropped_fraction: scalar float32 mean over the layers.
        task_expert_counts: ``[Λ, R, E]`` int64 assignments per (token kind, expert).
    """

    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    task_expert_counts: Tensor


def moe_summary(moe_outs: Sequence[MoEOutput], num_experts: int, num_kinds: int, device: torch.device) -> MoESummary:
    """Stack the per-layer :class:`~supermoe_rec.modules.moe.MoEOutput` statistics of an encoder (R = ``num_kinds``)."""
    if not moe_outs:
        zero = torch.zeros((), device=device)
        empty_tokens = torch.zeros(0, num_experts, dtype=torch.long, device=device)  # (0, E)
        empty_kinds = torch.zeros(0, num_kinds, num_experts, dtype=torch.long, device=device)  # (0, R, E)
        return MoESummary(zero, zero, empty_tokens, zero, empty_kinds)
    counts = []
    for m in moe_outs:
        assert m.task_expert_counts is not None  # the encoders always pass token kinds
        counts.append(m.task_expert_counts)
    return MoESummary(
        balance_loss=torch.stack([m.balance_loss for m in moe_outs]).mean(),
        z_loss=torch.stack([m.z_loss for m in moe_outs]).mean(),
        tokens_per_expert=torch.stack([m.tokens_per_expert for m in moe_outs]),  # (Λ, E)
        dropped_fraction=torch.stack([m.dropped_fraction for m in moe_outs]).mean(),
        task_expert_counts=torch.stack(counts),  # (Λ, R, E)
    )


class EncoderOutput(NamedTuple):
    """What :class:`MoETransformerEncoder` returns.

    Attributes:
        user: ``[G, M]`` output at the ``[USER]`` token: the universal user representation.
        tasks: ``[G, T, M]`` task t's representation, read at its indicator token; without task tokens, ``user``
            expanded (a view) to ``[G, T, M]``.
        balance_loss: scalar float32, mean MoE load-balancing loss over the Λ MoE layers (unweighted; 0 if Λ = 0).
        z_loss: scalar float32, mean router z-loss over the MoE layers (unweighted; 0 if Λ = 0).
        tokens_per_expert: ``[Λ, E]`` int64 assignments per expert before dropping (each row sums to N * K).
        dropped_fraction: scalar float32, mean over MoE layers of the fraction of assignments dropped (0 if Λ = 0).
        task_expert_counts: ``[Λ, T + 2, E]`` int64 assignments per (token kind, expert); kinds are 0 = ``[USER]``,
            1..T = task tokens, T + 1 = history (rows 1..T are 0 without task tokens).
    """

    user: Tensor
    tasks: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    task_expert_counts: Tensor


class MoETransformerEncoder(nn.Module):
    """Transformer encoder of a user's behaviour sequence with sparse-MoE FFNs, ``[USER]`` and task tokens.

    Dimension letters: G sequences, L history length, T tasks, S = 1 + T + L tokens (1 + L without task tokens),
    M model width, E experts, K top-k, N real tokens (``sum_g 1 + T + lengths[g]``), Λ MoE layers.

    Input per sequence: a learned ``[USER]`` token, one learned indicator token per task (if
    ``config.encoder.use_task_tokens``), then the history items projected from ``input_dim`` to M (a Linear, only
    when they differ). ``context`` (e.g. a projection of profile features) is added to the ``[USER]`` and task tokens.

    - Positions: learned, for history items only, right-aligned: the most recent item has position 0, so a
      position means recency whatever the history length. Special tokens have their own embeddings instead.
    - Histories longer than ``max_history`` keep only their ``max_history`` most recent items.
    - Blocks: :class:`EncoderBlock` (pre-LayerNorm, bidirectional attention with a key-padding mask), then a final
      LayerNorm. Block i (0-based) is an MoE block when ``config.arch`` is ``supermoe`` and
      ``(i + 1) % config.moe.moe_every == 0`` (a :class:`~supermoe_rec.modules.moe.MoELayer` with
      ``num_tasks = T + 2`` token kinds). The other blocks use a :class:`~supermoe_rec.modules.experts.DenseFFN` of
      width ``config.encoder.ffn_hidden``; for ``dense_transformer`` with ``dense_hidden_for_moe_blocks`` given,
      the blocks that would be MoE blocks use that width instead (pass ``K * expert_hidden`` for a dense model of
      the same active size per token).
    - FFNs run on the N real tokens only; padding never reaches the outputs or the MoE statistics.
    - Token kinds for the MoE's ``task_expert_counts``: 0 = ``[USER]``, 1..T = task tokens, T + 1 = history.

    Init: ``[USER]``, task and position embeddings N(0, 0.02); linear layers LeCun-normal with zero biases.

    Args:
        config: :class:`~supermoe_rec.config.experiment.ModelConfig`: ``arch`` (``supermoe``: MoE blocks;
            ``dense_transformer``: none), ``encoder`` (``d_model``, ``num_layers``, ``num_heads``, ``ffn_hidden``,
            ``use_task_tokens``, ``dropout``) and ``moe``.
        num_tasks: T.
        input_dim: width of the history item vectors (the sequence embedding dim).
        dense_hidden_for_moe_blocks: FFN width of the would-be MoE blocks when they are dense
            (``dense_transformer``); ``None``: ``config.encoder.ffn_hidden``.
        device: where to allocate parameters (``meta`` for deferred init; then ``to_empty`` +
            ``reset_parameters``).
        expert_impl: :class:`~supermoe_rec.modules.experts.ExpertImpl` of the MoE layers.
        max_history: the most recent items kept per sequence (also the number of position embeddings).
        attention_impl: :class:`AttentionImpl`, SDPA or the plain reference.

    Example::

        >>> from supermoe_rec.config.experiment import EncoderConfig, ModelConfig, MoEConfig
        >>> _ = torch.manual_seed(0)
        >>> moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, moe_every=2)
        >>> cfg = ModelConfig(encoder=EncoderConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=32), moe=moe)
        >>> enc = MoETransformerEncoder(cfg, num_tasks=3, input_dim=8, max_history=10)
        >>> history = torch.randn(2, 5, 8)  # (G, L, input_dim), left-aligned, row 1 padded after 2 items
        >>> out = enc(history, lengths=torch.tensor([5, 2]))
        >>> out.user.shape, out.tasks.shape
        (torch.Size([2, 16]), torch.Size([2, 3, 16]))
        >>> out.tokens_per_expert.shape, out.task_expert_counts.shape  # Λ=1 MoE layer, T+2=5 token kinds
        (torch.Size([1, 4]), torch.Size([1, 5, 4]))
        >>> int(out.task_expert_counts.sum())  # N = (1+3+5) + (1+3+2) real tokens, K = 2 assignments each
        30
    """

    def __init__(
        self,
        config: ModelConfig,
        num_tasks: int,
        input_dim: int,
        dense_hidden_for_moe_blocks: int | None = None,
        device: torch.device | None = None,
        expert_impl: ExpertImpl = ExpertImpl.FAST,
        max_history: int = 50,
        attention_impl: AttentionImpl = AttentionImpl.SDPA,
    ) -> None:
        super().__init__()
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
        enc = config.encoder
        if config.arch not in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER):
            raise ValueError(f"the encoder belongs to the transformer archs, not model.arch={config.arch.value}")
        if input_dim < 1 or max_history < 1 or enc.num_layers < 1:
            raise ValueError(
                f"input_dim, max_history and num_layers must be >= 1, got {input_dim}, {max_history}, {enc.num_layers}"
            )
        if config.moe.moe_every < 1:
            raise ValueError(f"moe.moe_every must be >= 1, got {config.moe.moe_every}")
        M = enc.d_model
        self.config = config
        self.d_model = M
        self.num_tasks = num_tasks
        self.input_dim = input_dim
        self.max_history = max_history
        self.use_task_tokens = enc.use_task_tokens
        self.num_task_tokens = num_tasks if enc.use_task_tokens else 0
        self.num_experts = config.moe.num_experts
        self.dropout = enc.dropout

        self.user_token = nn.Parameter(torch.empty(M, device=device))  # (M,)
        self.task_tokens = nn.Parameter(torch.empty(self.num_task_tokens, M, device=device))  # (T', M)
        self.positions = nn.Parameter(torch.empty(max_history, M, device=device))  # (max_history, M)
        self.input_proj: nn.Linear | None = nn.Linear(input_dim, M, device=device) if input_dim != M else None

        self.blocks = nn.ModuleList(
            EncoderBlock(
                M,
                enc.num_heads,
                block_ffn(config, moe_slot, num_tasks + 2, dense_hidden_for_moe_blocks, device, expert_impl),
                enc.dropout,
                attention_impl,
                device=device,
            )
            for moe_slot in moe_slots(config)
        )
        self.final_norm = nn.LayerNorm(M, device=device)
        self._reset_own_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The Λ MoE layers, in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def _reset_own_parameters(self) -> None:
        nn.init.normal_(self.user_token, std=_TOKEN_INIT_STD)
        nn.init.normal_(self.task_tokens, std=_TOKEN_INIT_STD)
        nn.init.normal_(self.positions, std=_TOKEN_INIT_STD)
        if self.input_proj is not None:
            _init_linear(self.input_proj)

    def reset_parameters(self) -> None:
        """Re-initialise everything (e.g. after ``to_empty`` on a meta-built encoder)."""
        self._reset_own_parameters()
        for block in self.blocks:
            assert isinstance(block, EncoderBlock)
            block.reset_parameters()
        self.final_norm.reset_parameters()

    def _truncate(self, history: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Keep at most ``max_history`` most recent items per row and drop all-padding columns.

        Returns ``history`` ``[G, L', input_dim]`` (L' = min(max length, max_history)) and lengths ``[G]``.
        """
        G, L, _ = history.shape
        if lengths.shape != (G,):
            raise ValueError(f"lengths must have shape [G]=[{G}], got {list(lengths.shape)}")
        max_len = int(lengths.max()) if G > 0 else 0
        if G > 0 and (int(lengths.min()) < 0 or max_len > L):
            raise ValueError(f"lengths must lie in [0, L={L}], got [{int(lengths.min())}, {max_len}]")
        kept_lengths = lengths.clamp(max=self.max_history)  # (G,)
        L_kept = min(max_len, self.max_history)
        if max_len <= self.max_history:
            # Columns past the longest history are all padding: trimming them saves attention compute.
            return history[:, :L_kept], kept_lengths  # (G, L', input_dim)
        # Left-aligned, so row g's most recent items are [len_g - kept_g, len_g): shift each row left.
        start = lengths - kept_lengths  # (G,)
        cols = start.unsqueeze(1) + torch.arange(L_kept, device=history.device)  # (G, L')
        cols = cols.clamp(max=L - 1)  # padding columns of short rows; masked anyway
        history = history.gather(1, cols.unsqueeze(-1).expand(G, L_kept, self.input_dim))  # (G, L', input_dim)
        return history, kept_lengths

    def forward(self, history: Tensor, lengths: Tensor, context: Tensor | None = None) -> EncoderOutput:
        """Encode G sequences.

        Args:
            history: ``[G, L, input_dim]`` item vectors, left-aligned (item j of sequence g at ``[g, j]`` for
                ``j < lengths[g]``, oldest first); values at padding positions are ignored. L may be 0.
            lengths: ``[G]`` int64 history lengths in ``[0, L]`` (0: only the special tokens are encoded). Rows
                longer than ``max_history`` keep their ``max_history`` most recent items.
            context: optional ``[G, M]`` added to the ``[USER]`` and every task token of its row.

        Returns:
            :class:`EncoderOutput`: ``user`` ``[G, M]``, ``tasks`` ``[G, T, M]``, scalar ``balance_loss``,
            ``z_loss`` and ``dropped_fraction``, ``tokens_per_expert`` ``[Λ, E]``, ``task_expert_counts``
            ``[Λ, T + 2, E]``.
        """
        if history.dim() != 3 or history.shape[2] != self.input_dim:
            raise ValueError(f"history must be [G, L, input_dim={self.input_dim}], got {list(history.shape)}")
        history, lengths = self._truncate(history, lengths)
        G, L, _ = history.shape
        M, T, Tp = self.d_model, self.num_tasks, self.num_task_tokens
        S = 1 + Tp + L
        device = history.device

        special = torch.cat([self.user_token.expand(G, 1, M), self.task_tokens.expand(G, Tp, M)], dim=1)  # (G, 1+T', M)
        if context is not None:
            if context.shape != (G, M):
                raise ValueError(f"context must be [G, M]=[{G}, {M}], got {list(context.shape)}")
            special = special + context.unsqueeze(1)  # (G, 1+T', M)

        steps = torch.arange(L, device=device)  # (L,)
        item_valid = steps < lengths.unsqueeze(1)  # (G, L)
        recency = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # (G, L) 0 = most recent; padding clamped
        items: Tensor = self.input_proj(history) if self.input_proj is not None else history  # (G, L, M)
        items = items + self.positions[recency]  # (G, L, M)
        # Zero padding so that garbage (even NaN) there cannot leak through the masked attention's 0 * value.
        items = items.masked_fill(~item_valid.unsqueeze(-1), 0.0)
        x = torch.cat([special, items], dim=1)  # (G, S, M)
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=True)

        key_valid = torch.cat([item_valid.new_ones(G, 1 + Tp), item_valid], dim=1)  # (G, S)
        real_index = key_valid.reshape(G * S).nonzero().squeeze(1)  # (N,)
        kinds = torch.cat(
            [
                torch.zeros(1, dtype=torch.long, device=device),
                torch.arange(1, Tp + 1, device=device),
                torch.full((L,), T + 1, dtype=torch.long, device=device),
            ]
        )  # (S,)
        token_kinds = kinds.expand(G, S).reshape(G * S).index_select(0, real_index)  # (N,)

        moe_outs: list[MoEOutput] = []
        for block in self.blocks:
            x, moe_out = block(x, key_valid, real_index, token_kinds)  # (G, S, M)
            if moe_out is not None:
                moe_outs.append(moe_out)

        # Only the special tokens are read, so only they need the final norm.
        out: Tensor = self.final_norm(x[:, : 1 + Tp])  # (G, 1+T', M)
        user = out[:, 0]  # (G, M)
        tasks = out[:, 1:] if self.use_task_tokens else user.unsqueeze(1).expand(G, T, M)  # (G, T, M)

        return EncoderOutput(user, tasks, *moe_summary(moe_outs, self.num_experts, T + 2, device))
