"""SUPERMOE: TorchRec embeddings -> sparse-MoE transformer over the behaviour sequence -> multi-task towers.

Dimension letters: B rows (candidates), G groups (one encoder pass each), L history length, D embedding dim,
M model dim, T tasks, P/I profile/item feature widths, F dense features.

Data flow of :class:`SuperMoERec`::

    batch.sparse_features, batch.sequence_features --SparseArch--> pooled [B, D] / sequences [B, L, D]
    leader rows (one per group) --> history [G, L, D], profile [G, P] --Linear--> context [G, M]
    MoETransformerEncoder([USER] + task tokens + history, context) --> user [G, M], tasks [G, T, M]
    match_t = tasks[group_index, t] * item_proj(item [B, I])  [B, M]       (only with item_interaction)
    tower_t([tasks[group_index, t], match_t, item, profile [B, P], dense [B, F]]) --> prediction_t [B]

Every candidate of a group (a positive and its negative) is scored from one encoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from supermoe_rec.data.schema import ITEM_CANDIDATES
from supermoe_rec.models.layout import FeatureLayout, concat_pooled, history_of, leader_rows
from supermoe_rec.modules.causal import CausalEncoderOutput, CausalMoEEncoder, read_positions
from supermoe_rec.modules.padding import pad_rows
from supermoe_rec.modules.towers import MultiTaskTowers
from supermoe_rec.modules.transformer import MoETransformerEncoder

if TYPE_CHECKING:  # annotations only: the over-arch imports without TorchRec (supermoe_rec.serving relies on it)
    from supermoe_rec.data.batch import Batch
    from supermoe_rec.modules.embeddings import SparseArch, SparseOutput


@dataclass
class ModelOutput:
    """What every model returns.

    Attributes:
        predictions: task name -> [B] (a logit for binary tasks, a value for regression tasks).
        user: [G, M] universal user representation (the [USER] token), or None for MLP models.
        task_representations: [G, T, M] per-task representations, or None for MLP models.
        group_index: [B] group of each row (rows -> user/task representations).
        balance_loss, z_loss: scalar MoE auxiliary losses (0 when the model has no MoE layer), unweighted.
        tokens_per_expert: [MoE layers, E]; dropped_fraction: scalar; task_expert_counts: [MoE layers, T+2, E].
    """

    predictions: dict[str, torch.Tensor]
    group_index: torch.Tensor
    user: torch.Tensor | None = None
    task_representations: torch.Tensor | None = None
    balance_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    z_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens_per_expert: torch.Tensor | None = None
    dropped_fraction: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    task_expert_counts: torch.Tensor | None = None
    next_items: NextItemsInputs | None = None


@dataclass
class NextItemsInputs:
    """What the next-items loss reads (:class:`supermoe_rec.objectives.next_items.NextItemsLoss`), for the batch's
    groups.

    Attributes:
        query: [G, D] the [USER] vectors projected to the item table's width.
        positives: [G, W, D] embeddings of each group's future items; ``positive_ids`` [G, W]; ``positive_mask`` [G, W].
        candidates: [N, D] embeddings of the batch's candidate items; ``candidate_ids`` [N].
    """

    query: torch.Tensor
    positives: torch.Tensor
    positive_ids: torch.Tensor
    positive_mask: torch.Tensor
    candidates: torch.Tensor
    candidate_ids: torch.Tensor


def _padded_ids(batch: Batch, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Ids of sequence feature ``name`` at ``rows``, padded with 0: ``[R, L]`` int64."""
    jt = batch.sequence_features[name]
    return pad_rows(jt.values().long(), jt.lengths().long(), rows)


class SuperMoEOverArch(nn.Module):
    """Everything above the embeddings: history/profile assembly, the MoE encoder and the towers.

    A separate module because TorchRec's pipeline traces modules that hold sharded tables with torch.fx: keeping
    this data-dependent code in a module without tables makes it one opaque node of that trace.

    Args:
        encoder: the MoE transformer over the history.
        towers: one tower per task; tower input width from :meth:`tower_input_dim`.
        layout: which features are profile, item and history.
        profile_dim: P, the width of the concatenated profile features (0: no profile, no context).
        embedding_dim: D, the width of history embeddings.
        item_dim: I, the width of the concatenated item features; needed with ``item_interaction``.
        item_interaction: add the product of each task representation and the projected candidate item to its
            tower's input. Without it the towers must learn the user-item match from a concatenation alone.
        read_user: every tower also reads the [USER] vector, next to its task token, so the supervised tasks
            shape the universal vector too.
        item_table_dim: width of the item table that the next-items objective scores against (0: no objective).
            The [USER] vector reaches that width through a learned projection when the widths differ.
        device: where the parameters live.
    """

    def __init__(
        self,
        encoder: MoETransformerEncoder | CausalMoEEncoder,
        towers: MultiTaskTowers,
        layout: FeatureLayout,
        profile_dim: int,
        embedding_dim: int,
        item_dim: int = 0,
        item_interaction: bool = False,
        read_user: bool = False,
        item_table_dim: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if item_interaction and not item_dim:
            raise ValueError("item_interaction needs item features (item_dim > 0)")
        if item_table_dim and layout.next_items is None:
            raise ValueError("item_table_dim is set, but the schema names no next_items feature")
        self.read_user = read_user
        self.item_table_dim = item_table_dim
        self.user_proj: nn.Linear | None = None
        if item_table_dim and item_table_dim != encoder.d_model:
            self.user_proj = nn.Linear(encoder.d_model, item_table_dim, bias=False, device=device)
        self.encoder = encoder
        self.towers = towers
        self.layout = layout
        self.embedding_dim = embedding_dim
        self.task_names = [t.name for t in towers.tasks]
        # The profile conditions the [USER] and task tokens, so the encoder knows who it is encoding.
        self.context = nn.Linear(profile_dim, encoder.d_model, device=device) if profile_dim else None
        self.item_proj = nn.Linear(item_dim, encoder.d_model, device=device) if item_interaction else None

    @staticmethod
    def tower_input_dim(
        model_dim: int,
        item_dim: int,
        profile_dim: int,
        num_dense: int,
        item_interaction: bool = False,
        read_user: bool = False,
    ) -> int:
        """M (task representation) [+ M (match)] [+ M ([USER])] + I + P + F."""
        return model_dim * (1 + int(item_interaction) + int(read_user)) + item_dim + profile_dim + num_dense

    def user_query(self, user: torch.Tensor) -> torch.Tensor:
        """[G, M] [USER] vectors -> [G, D] queries against the item table."""
        if not self.item_table_dim:
            raise ValueError("this model was built without the next-items objective: its [USER] scores no items")
        return self.user_proj(user) if self.user_proj is not None else user

    def score_items(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores [G, N] of items [N, D] (rows of the item table) for users [G, M], as the next-items loss scores."""
        return self.user_query(user) @ items.T

    def _next_items(self, emb: SparseOutput, batch: Batch, rows: torch.Tensor, user: torch.Tensor) -> NextItemsInputs:
        name = self.layout.next_items
        assert name is not None
        positives = emb.padded(name, rows)  # (G, W, D)
        W = positives.shape[1]
        mask = torch.arange(W, device=rows.device)[None, :] < emb.lengths[name][rows][:, None]  # (G, W)
        ids = _padded_ids(batch, name, rows)  # (G, W)
        return NextItemsInputs(
            query=self.user_query(user),
            positives=positives,
            positive_ids=ids,
            positive_mask=mask.to(positives.dtype),
            candidates=emb.values[ITEM_CANDIDATES],  # (N, D), in the ids' order
            candidate_ids=batch.sequence_features[ITEM_CANDIDATES].values().long(),
        )

    def _generative_next_items(
        self, emb: SparseOutput, batch: Batch, rows: torch.Tensor, states: torch.Tensor, lengths: torch.Tensor
    ) -> NextItemsInputs:
        """Every owned token of every group predicts the chunk's next item: token k the item at token k + 1.

        Dimension letters: G groups, S = 1 + L tokens, O owned tokens with a next item, D item-table width.
        """
        assert batch.target_start is not None
        name = self.layout.history[0]
        S = states.shape[1]
        k = torch.arange(S, device=states.device)[None, :]  # (1, S)
        owned = (k >= batch.target_start[:, None]) & (k < lengths[:, None])  # (G, S): tokens with a next item
        g_idx, k_idx = owned.nonzero(as_tuple=True)  # (O,), (O,)
        items = emb.padded(name, rows)  # (G, L, D): item j sits on token j + 1
        ids = _padded_ids(batch, name, rows)  # (G, L)
        positives = items[g_idx, k_idx].unsqueeze(1)  # (O, 1, D)
        return NextItemsInputs(
            query=self.user_query(states[g_idx, k_idx]),  # (O, D)
            positives=positives,
            positive_ids=ids[g_idx, k_idx].unsqueeze(1),  # (O, 1)
            positive_mask=positives.new_ones(positives.shape[:2]),  # (O, 1)
            candidates=emb.values[ITEM_CANDIDATES],  # (N, D), in the ids' order
            candidate_ids=batch.sequence_features[ITEM_CANDIDATES].values().long(),
        )

    def forward(self, emb: SparseOutput, batch: Batch) -> ModelOutput:
        """Returns: :class:`ModelOutput` with predictions [B] per task, user [G, M], task reps [G, T, M].

        With the causal encoder every row reads its token: ``batch.position_index`` in the generative layout, else
        the token after its group's whole history (the per-group layout, e.g. a serving or probe batch).
        """
        rows = leader_rows(batch.group_index)  # (G,)
        B = batch.batch_size
        profile = concat_pooled(emb, self.layout.profile, B, batch.labels)  # (B, P)
        item = concat_pooled(emb, self.layout.item, B, batch.labels)  # (B, I)
        history, lengths = history_of(emb, self.layout.history, rows, self.embedding_dim, batch.labels)
        context = self.context(profile[rows]) if self.context is not None else None  # (G, M)
        enc = self.encoder(history, lengths, context)
        next_items: NextItemsInputs | None = None
        if isinstance(enc, CausalEncoderOutput):
            position = batch.position_index if batch.position_index is not None else lengths[batch.group_index]
            task_reps = read_positions(enc.tasks, batch.group_index, position)  # (B, T, M)
            row_user = read_positions(enc.states, batch.group_index, position)  # (B, M)
            user = enc.states[torch.arange(len(rows), device=rows.device), lengths]  # (G, M): after the history
            group_tasks = enc.tasks[torch.arange(len(rows), device=rows.device), lengths]  # (G, T, M)
            if self.item_table_dim:
                next_items = (
                    self._generative_next_items(emb, batch, rows, enc.states, lengths)
                    if batch.target_start is not None
                    else self._next_items(emb, batch, rows, user)
                )
        else:
            task_reps = enc.tasks[batch.group_index]  # (B, T, M): every candidate reads its group's pass
            row_user = enc.user[batch.group_index]  # (B, M)
            user, group_tasks = enc.user, enc.tasks
            if self.item_table_dim:
                next_items = self._next_items(emb, batch, rows, user)
        shared = torch.cat([item, profile, batch.dense_features], dim=1)  # (B, I + P + F)
        if self.item_proj is not None:
            candidate = self.item_proj(item).unsqueeze(1)  # (B, 1, M)
            task_reps = torch.cat([task_reps, task_reps * candidate], dim=2)  # (B, T, 2M): rep, rep ⊙ item
        if self.read_user:
            shared = torch.cat([row_user, shared], dim=1)  # (B, M + I + P + F)
        inputs = {name: torch.cat([task_reps[:, t], shared], dim=1) for t, name in enumerate(self.task_names)}
        return ModelOutput(
            next_items=next_items,
            predictions=self.towers(inputs),
            group_index=batch.group_index,
            user=user,
            task_representations=group_tasks,
            balance_loss=enc.balance_loss,
            z_loss=enc.z_loss,
            tokens_per_expert=enc.tokens_per_expert,
            dropped_fraction=enc.dropped_fraction,
            task_expert_counts=enc.task_expert_counts,
        )


class SuperMoERec(nn.Module):
    """The SUPERMOE model, assembled from built modules: ``SparseArch`` then ``SuperMoEOverArch``.

    Args:
        sparse_arch: the TorchRec embedding tables (:class:`SparseArch`).
        encoder: the MoE transformer over the history.
        towers: one tower per task; tower input width from :meth:`tower_input_dim`.
        layout: which features are profile, item and history.
        profile_dim: P, the width of the concatenated profile features.
        item_dim: I, the width of the concatenated item features.
        item_interaction, read_user, item_table_dim: see :class:`SuperMoEOverArch`.
        device: where the dense parameters live.

    Example::

        >>> from supermoe_rec.models.factory import build_model, tiny_schema_and_batch
        >>> from supermoe_rec.config.experiment import ModelConfig
        >>> schema, batch = tiny_schema_and_batch()
        >>> model = build_model(ModelConfig(), schema)
        >>> out = model(batch)
        >>> sorted(out.predictions), out.predictions["click"].shape, out.user.shape
        (['click', 'rating'], torch.Size([4]), torch.Size([2, 64]))
    """

    tower_input_dim = SuperMoEOverArch.tower_input_dim

    def __init__(
        self,
        sparse_arch: SparseArch,
        encoder: MoETransformerEncoder | CausalMoEEncoder,
        towers: MultiTaskTowers,
        layout: FeatureLayout,
        profile_dim: int,
        item_dim: int = 0,
        item_interaction: bool = False,
        read_user: bool = False,
        item_table_dim: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.over_arch = SuperMoEOverArch(
            encoder,
            towers,
            layout,
            profile_dim,
            sparse_arch.embedding_dim,
            item_dim,
            item_interaction,
            read_user=read_user,
            item_table_dim=item_table_dim,
            device=device,
        )

    @property
    def encoder(self) -> MoETransformerEncoder | CausalMoEEncoder:
        return self.over_arch.encoder

    @property
    def towers(self) -> MultiTaskTowers:
        return self.over_arch.towers

    def forward(self, batch: Batch) -> ModelOutput:
        """Score every row of ``batch`` for every task.

        Returns:
            :class:`ModelOutput` with predictions [B] per task, user [G, M] and task representations [G, T, M].
        """
        out: ModelOutput = self.over_arch(
            self.sparse_arch(batch.sparse_features, batch.sequence_features, self.sparse_arch.bag_input(batch)), batch
        )
        return out
