"""Causal sparse-MoE transformer over a user's whole behaviour sequence: one pass, a user state at every position.

Dimension letters: G sequences (users, or chunks of one user's sequence), L items per sequence, S = 1 + L tokens,
M model width, Dh head width, T tasks, W attention window (items), E experts, K top-k, N real tokens, Λ MoE layers.

Token layout of sequence g (left-aligned, padding last)::

    [START] | item_0 ... item_{len_g - 1} | padding ...

Token s is the user's state after the first s items: token 0 (``[START]``, a learned embedding) is the state before
any item, token s ≥ 1 sits on item s - 1. The profile context, a per-user constant, is added to every token. A
sample whose history is the items before position p is scored from token p, so one pass over a user's sequence
serves every target of that user.

- **Causal band.** Token s attends to ``[START]`` and to the item tokens ``s - W + 1 .. s``: the W most recent items,
  as the per-group encoder's ``max_history`` window. Through Λ' blocks the receptive field grows to Λ' (W - 1) + 1
  items (docs/protocol.md says what this changes). No query row is ever empty: every token sees itself and
  ``[START]``. Padding sits after the real tokens, so a real token never sees a padding key.
- **Relative positions.** Each block has a learned bias per head and distance ``s - j`` in ``[0, W)``, and one per
  head for ``[START]`` (T5 / HSTU style). No absolute position enters, so a token's output depends only on the
  items before it: one pass gives at token s exactly what a pass over the prefix ending at s gives.
- **Task readouts** (``model.encoder.use_task_tokens``). The task indicators of the per-group encoder are tokens that
  read the whole history, which a causal pass cannot allow. Here every token s gets T task representations: task k's
  learned query (added to the normalised state at s) attends through the same causal band, then an FFN, a sparse MoE
  on the MoE archs, is routed with the task as its token kind (``task_routers`` then gives each task its own router
  residual). So attention *and* routing differ per task, at every position. Without task tokens every task reads the
  state itself.
- **MoE.** Every ``moe_every``-th block's FFN is a :class:`~supermoe_rec.modules.moe.MoELayer`, run per real token
  (capacity or dropless, shared experts, sigmoid router, bias balancing, statistics) exactly as in the per-group
  encoder. Token kinds for the statistics: 0 = ``[START]``, 1..T = the task readouts, T + 1 = history items.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.config.experiment import Arch, ModelConfig
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer, MoEOutput
from supermoe_rec.modules.transformer import (
    AttentionImpl,
    EncoderBlock,
    MultiHeadSelfAttention,
    block_ffn,
    moe_slots,
    moe_summary,
)

__all__ = [
    "CausalEncoderOutput",
    "CausalMoEEncoder",
    "CausalSelfAttention",
    "TaskReadout",
    "band_mask",
    "local_attention",
    "read_positions",
    "reference_band_attention",
]

_TOKEN_INIT_STD = 0.02  # as the per-group encoder's token embeddings (measured there on ml100k)


def band_mask(num_tokens: int, window: int, start_bias: Tensor, distance_bias: Tensor) -> Tensor:
    """The additive attention mask of one block: ``[1, H, S, S]``, a bias where token s may attend key j, else -inf.

    Token s sees key 0 (``[START]``, bias ``start_bias[h]``) and the item keys ``j`` with ``1 <= j <= s`` and
    ``s - j < window`` (bias ``distance_bias[h, s - j]``).

    Example::

        >>> m = band_mask(4, window=2, start_bias=torch.zeros(1), distance_bias=torch.tensor([[1.0, 2.0]]))
        >>> m[0, 0]
        tensor([[0., -inf, -inf, -inf],
                [0., 1., -inf, -inf],
                [0., 2., 1., -inf],
                [0., -inf, 2., 1.]])
    """
    S, H = num_tokens, distance_bias.shape[0]
    steps = torch.arange(S, device=distance_bias.device)
    dist = steps[:, None] - steps[None, :]  # (S, S) query - key
    in_band = (dist >= 0) & (dist < window) & (steps[None, :] >= 1)  # (S, S) item keys in the window
    bias = distance_bias[:, dist.clamp(0, window - 1)]  # (H, S, S)
    neg_inf = torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device)
    mask = torch.where(in_band, bias, neg_inf)  # (H, S, S)
    start = start_bias.view(H, 1).expand(H, S)  # (H, S): every query sees [START]
    mask = torch.cat([start.unsqueeze(2), mask[:, :, 1:]], dim=2)  # (H, S, S)
    return mask.unsqueeze(0)  # (1, H, S, S)


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, start_bias: Tensor, distance_bias: Tensor, queries_per_token: int = 1
) -> Tensor:
    """Band attention computed block by block: what :func:`band_mask` allows, at O(S W) instead of O(S²).

    Tokens are cut into blocks of ``Bs = min(W, S)``; the queries of block b attend to the keys of blocks b - 1 and b
    (under the band) and to ``[START]``, so each query scores 2 Bs + 1 keys whatever the sequence length.

    Args:
        q: ``[G, H, S * Q, Dh]`` queries, token-major (query ``s * Q + r`` belongs to token s).
        k, v: ``[G, H, S, Dh]``.
        window: W.
        start_bias, distance_bias: ``[H]`` and ``[H, W]``, as :func:`band_mask`.
        queries_per_token: Q.

    Returns:
        ``[G, H, S * Q, Dh]``.
    """
    G, H, S, Dh = k.shape
    Q = queries_per_token
    Bs = max(1, min(window, S))
    nb = -(-S // Bs)
    pad = nb * Bs - S

    def blocks(x: Tensor) -> Tensor:
        # [START], the previous block and this block as each block's keys; one empty block stands before block 0.
        b = F.pad(x, (0, 0, Bs, pad)).view(G, H, nb + 1, Bs, Dh)  # (G, H, nb+1, Bs, Dh)
        start = x[:, :, None, :1].expand(G, H, nb, 1, Dh)
        return torch.cat([start, b[:, :, :-1], b[:, :, 1:]], dim=3)  # (G, H, nb, 2Bs+1, Dh)

    kb, vb = blocks(k), blocks(v)
    qb = F.pad(q, (0, 0, 0, pad * Q)).view(G, H, nb, Bs * Q, Dh)  # (G, H, nb, Bs*Q, Dh)

    i = torch.arange(Bs, device=k.device)  # query token within its block
    c = torch.arange(2 * Bs, device=k.device)  # key slot: token b*Bs - Bs + c
    dist = Bs + i[:, None] - c[None, :]  # (Bs, 2Bs) query - key
    key_token = torch.arange(nb, device=k.device)[:, None, None] * Bs - Bs + c[None, None, :]  # (nb, 1, 2Bs)
    allowed = (dist >= 0) & (dist < window) & (key_token >= 1)  # (nb, Bs, 2Bs); token 0 is the [START] slot
    bias = distance_bias[:, dist.clamp(0, window - 1)]  # (H, Bs, 2Bs)
    neg_inf = torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device)
    mask = torch.where(allowed[None], bias[:, None], neg_inf)  # (H, nb, Bs, 2Bs)
    mask = torch.cat([start_bias.view(H, 1, 1, 1).expand(H, nb, Bs, 1), mask], dim=3)  # (H, nb, Bs, 2Bs+1)
    if Q > 1:
        mask = mask.repeat_interleave(Q, dim=2)  # (H, nb, Bs*Q, 2Bs+1)
    # Written out rather than through SDPA: on CPU, SDPA with a float mask takes its math path plus an all(-inf)
    # scan of every row, which we do not need (every row keeps [START]).
    scores = torch.matmul(qb, kb.transpose(-1, -2)) * (Dh**-0.5) + mask.unsqueeze(0).to(q.dtype)  # (G,H,nb,BsQ,2Bs+1)
    y = torch.matmul(torch.softmax(scores, dim=-1), vb)  # (G, H, nb, Bs*Q, Dh)
    return y.reshape(G, H, nb * Bs * Q, Dh)[:, :, : S * Q]


def reference_band_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, start_bias: Tensor, distance_bias: Tensor, queries_per_token: int = 1
) -> Tensor:
    """The plain reference of :func:`local_attention`: the whole ``[S, S]`` band mask and an explicit softmax."""
    S, Dh = k.shape[2], k.shape[3]
    mask = band_mask(S, window, start_bias, distance_bias).repeat_interleave(queries_per_token, dim=2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh) + mask  # (G, H, S*Q, S)
    return torch.softmax(scores, dim=-1) @ v


class _BandBias(nn.Module):
    """The learned biases of one attention: per head, one for ``[START]`` and one per distance in ``[0, W)``."""

    def __init__(self, num_heads: int, window: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.window = window
        self.start = nn.Parameter(torch.zeros(num_heads, device=device))  # (H,)
        self.distance = nn.Parameter(torch.zeros(num_heads, window, device=device))  # (H, W)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.start)
        nn.init.zeros_(self.distance)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, impl: AttentionImpl, queries_per_token: int = 1) -> Tensor:
        """Band attention of ``q`` over ``k, v`` under these biases (:func:`local_attention` or its reference)."""
        fn = local_attention if impl is AttentionImpl.SDPA else reference_band_attention
        return fn(q, k, v, self.window, self.start, self.distance, queries_per_token)


class CausalSelfAttention(MultiHeadSelfAttention):
    """Multi-head self-attention under the causal band, with relative-position biases (see the module docstring).

    No dropout on the attention probabilities: it cost as much as the attention itself on CPU, and the residual
    dropout of the blocks stays.

    Args:
        d_model: M.
        num_heads: heads; must divide M.
        window: W.
        impl: :class:`~supermoe_rec.modules.transformer.AttentionImpl`: ``SDPA`` runs :func:`local_attention`,
            ``REFERENCE`` the full-mask softmax.
        device: where the parameters live.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> attn = CausalSelfAttention(8, num_heads=2, window=3)
        >>> attn(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        window: int,
        impl: AttentionImpl = AttentionImpl.SDPA,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(d_model, num_heads, dropout=0.0, impl=impl, device=device)
        self.bias = _BandBias(num_heads, window, device=device)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "bias"):
            self.bias.reset_parameters()

    def forward(self, x: Tensor, key_valid: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend under the band (``key_valid`` and ``attn_mask`` are unused: causality makes padding unreachable).

        Returns:
            ``[G, S, M]`` attention output after the output projection (no residual).
        """
        G, S, M = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(G, S, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (G, H, S, Dh)
        y = self.bias.attend(q, k, v, self.impl)  # (G, H, S, Dh)
        out: Tensor = self.out(y.transpose(1, 2).reshape(G, S, M))
        return out


class CausalEncoderOutput(NamedTuple):
    """What :class:`CausalMoEEncoder` returns.

    Attributes:
        states: ``[G, S, M]`` the user state after each prefix (token s: after s items), final-normed. The universal
            user vector at time t is the state at t's token.
        tasks: ``[G, S, T, M]`` task k's representation at each token; without task readouts, ``states`` expanded.
        balance_loss, z_loss, dropped_fraction: scalar float32 means over the Λ MoE layers (0 without MoE).
        tokens_per_expert: ``[Λ, E]`` int64 assignments per expert before dropping.
        task_expert_counts: ``[Λ, T + 2, E]`` int64 assignments per (token kind, expert).
    """

    states: Tensor
    tasks: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    task_expert_counts: Tensor


def read_positions(values: Tensor, group_index: Tensor, position_index: Tensor) -> Tensor:
    """Rows' values at their tokens: ``values[group_index, position_index]`` (``[G, S, ...]`` -> ``[B, ...]``).

    Example::

        >>> read_positions(torch.arange(6).view(2, 3), torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])).tolist()
        [2, 3, 4]
    """
    return values[group_index, position_index]


class TaskReadout(nn.Module):
    """Per-task representations at every token: a task query attends causally, then a (task-routed) FFN.

    Dimension letters: G sequences, S tokens, T tasks, M model width, Dh head width, N real tokens.

    ``tasks[g, s, k] = r + ffn_k(LN(r))`` with ``r = states[g, s] + Attn(q = LN(states[g, s]) + e_k,
    keys = LN(states[g, j]) for j in the band of s)``. ``ffn_k`` is one FFN; as an MoE layer it routes each (token,
    task) with task id k + 1, so a router per task kind (``task_routers``) can send tasks to different experts.

    Args:
        d_model: M.
        num_heads: attention heads (divides M).
        num_tasks: T.
        window: W, as the encoder's.
        ffn: ``[N, M] -> [N, M]``, dense or MoE.
        device: where the parameters live.
        impl: :class:`~supermoe_rec.modules.transformer.AttentionImpl` of the readout's attention.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> r = TaskReadout(8, num_heads=2, num_tasks=3, window=4, ffn=DenseFFN(8, 16))
        >>> r(torch.randn(2, 5, 8), torch.tensor([4, 2]))[0].shape  # (G, S, T, M)
        torch.Size([2, 5, 3, 8])
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_tasks: int,
        window: int,
        ffn: DenseFFN | MoELayer,
        device: torch.device | None = None,
        impl: AttentionImpl = AttentionImpl.SDPA,
    ) -> None:
        super().__init__()
        self.impl = AttentionImpl(impl)
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide d_model={d_model}, got {num_heads}")
        self.d_model, self.num_heads, self.num_tasks = d_model, num_heads, num_tasks
        self.task_queries = nn.Parameter(torch.empty(num_tasks, d_model, device=device))  # (T, M)
        self.query_norm = nn.LayerNorm(d_model, device=device)
        self.key_norm = nn.LayerNorm(d_model, device=device)
        self.q = nn.Linear(d_model, d_model, device=device)
        self.kv = nn.Linear(d_model, 2 * d_model, device=device)
        self.out = nn.Linear(d_model, d_model, device=device)
        self.bias = _BandBias(num_heads, window, device=device)
        self.ffn_norm = nn.LayerNorm(d_model, device=device)
        self.ffn = ffn
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.task_queries, std=_TOKEN_INIT_STD)
        for norm in (self.query_norm, self.key_norm, self.ffn_norm):
            norm.reset_parameters()
        for linear in (self.q, self.kv, self.out):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
            nn.init.zeros_(linear.bias)
        self.bias.reset_parameters()
        self.ffn.reset_parameters()

    def forward(self, states: Tensor, lengths: Tensor) -> tuple[Tensor, MoEOutput | None]:
        """Read every task at every token.

        Args:
            states: ``[G, S, M]`` block outputs (before the final norm).
            lengths: ``[G]`` items per sequence (tokens ``0..lengths[g]`` are real).

        Returns:
            ``(tasks [G, S, T, M], moe_out)``; ``moe_out`` is None for a dense FFN.
        """
        G, S, M = states.shape
        T, H = self.num_tasks, self.num_heads
        Dh = M // H
        q = self.q(self.query_norm(states).unsqueeze(2) + self.task_queries)  # (G, S, T, M)
        q = q.view(G, S * T, H, Dh).transpose(1, 2)  # (G, H, S*T, Dh), query row s*T + k
        k, v = self.kv(self.key_norm(states)).view(G, S, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (G, H, S, Dh)
        y = self.bias.attend(q, k, v, self.impl, queries_per_token=T)  # (G, H, S*T, Dh)
        y = self.out(y.transpose(1, 2).reshape(G, S, T, M))  # (G, S, T, M)
        r = states.unsqueeze(2) + y  # (G, S, T, M)

        real = torch.arange(S, device=states.device)[None, :] <= lengths[:, None]  # (G, S)
        real_index = real.reshape(G * S).nonzero().squeeze(1)  # (N,)
        flat = r.reshape(G * S, T, M).index_select(0, real_index)  # (N, T, M)
        N = flat.shape[0]
        h = self.ffn_norm(flat.reshape(N * T, M))  # (N*T, M)
        moe_out: MoEOutput | None = None
        if isinstance(self.ffn, MoELayer):
            kinds = torch.arange(1, T + 1, device=states.device).repeat(N)  # (N*T,) task k -> kind k + 1
            moe_out = self.ffn(h, task_ids=kinds)
            f = moe_out.hidden
        else:
            f = self.ffn(h)
        out = r.reshape(G * S, T, M).index_add(0, real_index, f.view(N, T, M).to(r.dtype))  # (G*S, T, M)
        return out.view(G, S, T, M), moe_out


class CausalMoEEncoder(nn.Module):
    """One causal pass over each user's sequence, a user state and T task representations at every token.

    See the module docstring for the token layout, the band mask, relative positions and task readouts. Block i
    (0-based) is an MoE block when ``config.arch`` is ``supermoe`` and ``(i + 1) % config.moe.moe_every == 0``; with
    ``dense_transformer`` and ``dense_hidden_for_moe_blocks`` those blocks are dense FFNs of that width (a dense
    twin of the same active size per token). The task readout's FFN follows the same rule as the last block.

    Args:
        config: :class:`~supermoe_rec.config.experiment.ModelConfig` (``arch``, ``encoder``, ``moe``).
        num_tasks: T.
        input_dim: width of the item vectors (the sequence embedding width).
        dense_hidden_for_moe_blocks: FFN width of the would-be MoE blocks of ``dense_transformer``.
        device: where to allocate parameters (``meta`` for deferred init).
        expert_impl: :class:`~supermoe_rec.modules.experts.ExpertImpl` of the MoE layers.
        max_history: W, the attention window in items.
        attention_impl: :class:`~supermoe_rec.modules.transformer.AttentionImpl` of the blocks.

    Example::

        >>> from supermoe_rec.config.experiment import EncoderConfig, ModelConfig, MoEConfig
        >>> _ = torch.manual_seed(0)
        >>> moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, moe_every=2)
        >>> cfg = ModelConfig(encoder=EncoderConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=32), moe=moe)
        >>> enc = CausalMoEEncoder(cfg, num_tasks=3, input_dim=8, max_history=10)
        >>> out = enc(torch.randn(2, 5, 8), lengths=torch.tensor([5, 2]))  # (G, L, input_dim), jagged
        >>> out.states.shape, out.tasks.shape  # S = 1 + L tokens
        (torch.Size([2, 6, 16]), torch.Size([2, 6, 3, 16]))
        >>> out.tokens_per_expert.shape  # one MoE block + the task readout's MoE
        torch.Size([2, 4])
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
        enc = config.encoder
        if config.arch not in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER):
            raise ValueError(f"the encoder belongs to the transformer archs, not model.arch={config.arch.value}")
        if num_tasks < 0 or input_dim < 1 or max_history < 1 or enc.num_layers < 1 or config.moe.moe_every < 1:
            raise ValueError(
                "num_tasks >= 0 and input_dim, max_history, num_layers, moe_every >= 1 are required, got "
                f"{num_tasks}, {input_dim}, {max_history}, {enc.num_layers}, {config.moe.moe_every}"
            )
        M = enc.d_model
        self.config = config
        self.d_model = M
        self.num_tasks = num_tasks
        self.input_dim = input_dim
        self.max_history = max_history
        self.num_experts = config.moe.num_experts
        self.dropout = enc.dropout
        self.use_task_tokens = enc.use_task_tokens and num_tasks > 0

        def ffn_for(moe_slot: bool) -> DenseFFN | MoELayer:
            return block_ffn(config, moe_slot, num_tasks + 2, dense_hidden_for_moe_blocks, device, expert_impl)

        self.start_token = nn.Parameter(torch.empty(M, device=device))  # (M,)
        self.input_proj: nn.Linear | None = nn.Linear(input_dim, M, device=device) if input_dim != M else None
        slots = moe_slots(config)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                M,
                enc.num_heads,
                ffn_for(slot),
                enc.dropout,
                device=device,
                attention=CausalSelfAttention(M, enc.num_heads, max_history, impl=attention_impl, device=device),
            )
            for slot in slots
        )
        self.readout: TaskReadout | None = None
        if self.use_task_tokens:
            self.readout = TaskReadout(
                M, enc.num_heads, num_tasks, max_history, ffn_for(slots[-1]), device=device, impl=attention_impl
            )
        self.final_norm = nn.LayerNorm(M, device=device)
        self._reset_own_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The Λ MoE layers: the blocks' in order, then the task readout's."""
        layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]
        if self.readout is not None and isinstance(self.readout.ffn, MoELayer):
            layers.append(self.readout.ffn)
        return layers

    @property
    def receptive_field(self) -> int:
        """Items a token's output can depend on: Λ' (W - 1) + 1 through the Λ' blocks and the readout."""
        return (len(self.blocks) + int(self.readout is not None)) * (self.max_history - 1) + 1

    def _reset_own_parameters(self) -> None:
        nn.init.normal_(self.start_token, std=_TOKEN_INIT_STD)
        if self.input_proj is not None:
            nn.init.normal_(self.input_proj.weight, std=self.input_proj.in_features**-0.5)
            nn.init.zeros_(self.input_proj.bias)

    def reset_parameters(self) -> None:
        """Re-initialise everything (e.g. after ``to_empty`` on a meta-built encoder)."""
        self._reset_own_parameters()
        for block in self.blocks:
            assert isinstance(block, EncoderBlock)
            block.reset_parameters()
        if self.readout is not None:
            self.readout.reset_parameters()
        self.final_norm.reset_parameters()

    def forward(self, history: Tensor, lengths: Tensor, context: Tensor | None = None) -> CausalEncoderOutput:
        """Encode G sequences in one causal pass.

        Args:
            history: ``[G, L, input_dim]`` item vectors, left-aligned, oldest first; padding values are ignored.
            lengths: ``[G]`` int64 items per sequence, in ``[0, L]``.
            context: optional ``[G, M]`` (a projection of the profile) added to ``[START]`` and every item token.

        Returns:
            :class:`CausalEncoderOutput`: ``states`` ``[G, 1 + L, M]``, ``tasks`` ``[G, 1 + L, T, M]`` and the MoE
            losses and statistics.
        """
        if history.dim() != 3 or history.shape[2] != self.input_dim:
            raise ValueError(f"history must be [G, L, input_dim={self.input_dim}], got {list(history.shape)}")
        G, L, _ = history.shape
        if lengths.shape != (G,):
            raise ValueError(f"lengths must have shape [G]=[{G}], got {list(lengths.shape)}")
        if G and (int(lengths.min()) < 0 or int(lengths.max()) > L):
            raise ValueError(f"lengths must lie in [0, L={L}], got [{int(lengths.min())}, {int(lengths.max())}]")
        M, T, S = self.d_model, self.num_tasks, 1 + L
        device = history.device

        start = self.start_token.expand(G, 1, M)  # (G, 1, M)
        if context is not None:
            if context.shape != (G, M):
                raise ValueError(f"context must be [G, M]=[{G}, {M}], got {list(context.shape)}")
            start = start + context.unsqueeze(1)
        items: Tensor = self.input_proj(history) if self.input_proj is not None else history  # (G, L, M)
        if context is not None:  # the user's profile conditions every position (a per-user constant: still causal)
            items = items + context.unsqueeze(1)
        item_valid = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (G, L)
        # Zero padding so that garbage (even NaN) there cannot reach a real token through 0 * value.
        items = items.masked_fill(~item_valid.unsqueeze(-1), 0.0)
        x = torch.cat([start.to(items.dtype), items], dim=1)  # (G, S, M)
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=True)

        real = torch.cat([item_valid.new_ones(G, 1), item_valid], dim=1)  # (G, S) tokens 0..len_g
        real_index = real.reshape(G * S).nonzero().squeeze(1)  # (N,)
        kinds = torch.full((S,), T + 1, dtype=torch.long, device=device)
        kinds[0] = 0  # [START]
        token_kinds = kinds.expand(G, S).reshape(G * S).index_select(0, real_index)  # (N,)

        moe_outs: list[MoEOutput] = []
        for block in self.blocks:
            x, moe_out = block(x, real, real_index, token_kinds)  # (G, S, M)
            if moe_out is not None:
                moe_outs.append(moe_out)
        if self.readout is not None:
            tasks, moe_out = self.readout(x, lengths)  # (G, S, T, M)
            if moe_out is not None:
                moe_outs.append(moe_out)
            tasks = self.final_norm(tasks)
        states: Tensor = self.final_norm(x)  # (G, S, M)
        if self.readout is None:
            tasks = states.unsqueeze(2).expand(G, S, T, M)
        return CausalEncoderOutput(states, tasks, *moe_summary(moe_outs, self.num_experts, T + 2, device))
