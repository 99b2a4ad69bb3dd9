"""MLP multi-task baselines (shared-bottom, MMoE, PLE, single-task) on the same SparseArch as SUPERMOE.

Dimension letters: B rows, G groups, L history length, D embedding dim, T tasks, X input width.

The history is mean-pooled (once per group, then read by each of the group's rows), then concatenated with the
item, profile and dense features into x [B, X]; a backbone maps x to one representation per task, and the towers
score them. Sharing the SparseArch, data and towers with SUPERMOE keeps the comparison about the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from supermoe_rec.data.batch import Batch
from supermoe_rec.models.layout import FeatureLayout, concat_pooled, history_of, leader_rows
from supermoe_rec.models.supermoe import ModelOutput
from supermoe_rec.modules.embeddings import SparseArch, SparseOutput
from supermoe_rec.modules.towers import MultiTaskTowers


class MLPOverArch(nn.Module):
    """Everything above the embeddings for the MLP baselines (a module without tables, see SuperMoEOverArch)."""

    def __init__(self, backbone: nn.Module, towers: MultiTaskTowers, layout: FeatureLayout, embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.towers = towers
        self.layout = layout
        self.embedding_dim = embedding_dim

    def forward(self, emb: SparseOutput, batch: Batch) -> ModelOutput:
        """Returns: :class:`ModelOutput` with predictions [B] per task (no user representation)."""
        rows = leader_rows(batch.group_index)
        B = batch.batch_size
        history, lengths = history_of(emb, self.layout.history, rows, self.embedding_dim, batch.labels)
        mean_history = history.sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(history.dtype)  # (G, D)
        x = torch.cat(
            [
                mean_history[batch.group_index],  # (B, D)
                concat_pooled(emb, self.layout.item, B, batch.labels),
                concat_pooled(emb, self.layout.profile, B, batch.labels),
                batch.dense_features,
            ],
            dim=1,
        )  # (B, X)
        return ModelOutput(predictions=self.towers(self.backbone(x)), group_index=batch.group_index)


class MultiTaskMLPRec(nn.Module):
    """An MLP backbone (SharedBottom, MMoE or PLE) between the SparseArch and the towers.

    Args:
        sparse_arch: the TorchRec embedding tables.
        backbone: maps x [B, X] to task name -> [B, H]; X = D (mean history) + I + P + F.
        towers: one tower per task over the backbone's [B, H].
        layout: which features are profile, item and history.

    Example::

        >>> from supermoe_rec.models.factory import build_model, tiny_schema_and_batch
        >>> from supermoe_rec.config.experiment import Arch, ModelConfig
        >>> schema, batch = tiny_schema_and_batch()
        >>> model = build_model(ModelConfig(arch=Arch.MMOE), schema)
        >>> model(batch).predictions["rating"].shape
        torch.Size([4])
    """

    def __init__(
        self, sparse_arch: SparseArch, backbone: nn.Module, towers: MultiTaskTowers, layout: FeatureLayout
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.over_arch = MLPOverArch(backbone, towers, layout, sparse_arch.embedding_dim)

    @property
    def towers(self) -> MultiTaskTowers:
        return self.over_arch.towers

    def forward(self, batch: Batch) -> ModelOutput:
        """Score every row of ``batch`` for every task.

        Returns:
            :class:`ModelOutput` with predictions [B] per task (no user representation).
        """
        out: ModelOutput = self.over_arch(
            self.sparse_arch(batch.sparse_features, batch.sequence_features, self.sparse_arch.bag_input(batch)), batch
        )
        return out
