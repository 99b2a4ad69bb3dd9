"""Build any ``model.arch`` from a config and a schema, and count its total and active parameters.

All archs share one :class:`SparseArch` construction, the same towers and the same feature layout, so they differ
only in what sits between the embeddings and the towers:

- ``supermoe``: MoE transformer with task-indicator tokens;
- ``dense_transformer``: the same encoder whose MoE FFNs are dense FFNs of the same active size (hidden K * H);
- ``shared_bottom`` / ``mmoe`` / ``ple``: MLP backbones over the mean-pooled history;
- ``single_task``: the shared-bottom MLP trained on exactly one task (select it with ``data.tasks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from supermoe_rec.config.experiment import Arch, ConfigError, ModelConfig
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.schema import Schema
from supermoe_rec.models.layout import FeatureLayout
from supermoe_rec.models.mlp import MultiTaskMLPRec
from supermoe_rec.models.supermoe import SuperMoERec
from supermoe_rec.modules.baselines import PLE, MMoE, SharedBottom
from supermoe_rec.modules.causal import CausalMoEEncoder
from supermoe_rec.modules.embeddings import SparseArch
from supermoe_rec.modules.experts import BatchedExperts
from supermoe_rec.modules.towers import MultiTaskTowers
from supermoe_rec.modules.transformer import MoETransformerEncoder


def _feature_dims(schema: Schema, cfg: ModelConfig) -> dict[str, int]:
    dims = {}
    for f in (*schema.sparse_features, *schema.sequence_features):
        dims[f.name] = schema.table(f.table).embedding_dim or cfg.embedding_dim
    return dims


def build_model(
    cfg: ModelConfig,
    schema: Schema,
    device: torch.device | None = None,
    max_history: int = 50,
    output_bias: Mapping[str, float] | None = None,
    sparse_device: torch.device | None = None,
) -> nn.Module:
    """Build ``cfg.arch`` for ``schema``'s features and tasks.

    Args:
        cfg: model config.
        schema: data schema (tables, features, tasks).
        device: where to build the dense (non-embedding) modules.
        max_history: longest history the encoder's positions cover.
        output_bias: initial output bias per task (e.g. the mean rating for a regression task).
        sparse_device: where to build the embedding tables (default: ``device``). ``meta`` lets
            DistributedModelParallel allocate only each rank's shards, while the dense modules keep the
            initialisation they were built with.
    """
    tasks = schema.task_specs()
    if cfg.arch is Arch.SINGLE_TASK and len(tasks) != 1:
        raise ConfigError(
            f"model.arch: single_task trains exactly one task, but data.tasks selects {[t.name for t in tasks]}; "
            "set e.g. --data.tasks=[watch]"
        )
    layout = FeatureLayout.from_schema(schema)
    dims = _feature_dims(schema, cfg)
    history_dims = {dims[n] for n in layout.history}
    if len(history_dims) > 1:
        raise ConfigError(f"schema: per-group sequence features {layout.history} must share one embedding dim")
    profile_dim = sum(dims[n] for n in layout.profile)
    item_dim = sum(dims[n] for n in layout.item)
    sparse_arch = SparseArch(schema, cfg.embedding_dim, cfg.sequence_lookup, device=sparse_device or device)

    if cfg.arch in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER):
        dense = cfg.arch is Arch.DENSE_TRANSFORMER
        encoder_cls = CausalMoEEncoder if cfg.encoder.generative else MoETransformerEncoder
        encoder = encoder_cls(
            cfg,
            num_tasks=len(tasks),
            input_dim=history_dims.pop() if history_dims else cfg.embedding_dim,
            dense_hidden_for_moe_blocks=cfg.moe.top_k * cfg.moe.expert_hidden if dense else None,
            device=device,
            max_history=max_history,
        )
        towers = MultiTaskTowers(
            tasks,
            SuperMoERec.tower_input_dim(
                cfg.encoder.d_model,
                item_dim,
                profile_dim,
                layout.num_dense,
                cfg.encoder.item_interaction,
                cfg.towers.read_user,
            ),
            cfg.towers.hidden,
            output_bias=output_bias,
            device=device,
        )
        next_items_table = schema.next_items_table()
        return SuperMoERec(
            sparse_arch,
            encoder,
            towers,
            layout,
            profile_dim,
            item_dim,
            cfg.encoder.item_interaction,
            read_user=cfg.towers.read_user,
            # A schema with future items gets the next-items head (the [USER] -> item-table projection).
            item_table_dim=(next_items_table.embedding_dim or cfg.embedding_dim) if next_items_table else 0,
            device=device,
        )

    in_features = cfg.embedding_dim + item_dim + profile_dim + layout.num_dense
    mlp = cfg.mlp
    backbone: nn.Module
    if cfg.arch in (Arch.SHARED_BOTTOM, Arch.SINGLE_TASK):
        backbone = SharedBottom(in_features, mlp.bottom_hidden, tasks, device=device)
    elif cfg.arch is Arch.MMOE:
        backbone = MMoE(in_features, mlp.mmoe_experts, mlp.bottom_hidden, tasks, device=device)
    elif cfg.arch is Arch.PLE:
        backbone = PLE(
            in_features,
            mlp.ple_shared_experts,
            mlp.ple_task_experts,
            mlp.bottom_hidden,
            tasks,
            num_levels=mlp.ple_levels,
            device=device,
        )
    else:  # pragma: no cover - every Arch member is handled above
        raise ConfigError(f"model.arch: {cfg.arch} has no builder")
    towers = MultiTaskTowers(tasks, int(backbone.output_dim), cfg.towers.hidden, output_bias=output_bias, device=device)
    return MultiTaskMLPRec(sparse_arch, backbone, towers, layout)


def count_parameters(model: nn.Module, top_k: int | None = None) -> dict[str, int]:
    """The one parameter counter: of any model, encoder or layer (built on any device, ``meta`` included).

    Args:
        model: the module.
        top_k: K, the experts each token runs; given, ``dense_active`` is counted too.

    Returns:
        ``total``; ``embedding`` (the tables of every :class:`SparseArch` inside); ``dense`` (= total - embedding,
        experts included); ``experts`` (every :class:`BatchedExperts`); with ``top_k``, ``dense_active``: the dense
        parameters one token (one sample) uses, i.e. ``dense`` less the E - K experts of each MoE layer it skips.

    Example::

        >>> from supermoe_rec.config.experiment import MoEConfig
        >>> from supermoe_rec.modules.moe import MoELayer
        >>> counts = count_parameters(MoELayer(4, MoEConfig(num_experts=4, top_k=1, expert_hidden=2)), top_k=1)
        >>> per_expert = 4 * 2 + 2 + 2 * 4 + 4  # w1, b1, w2, b2 of one expert
        >>> counts["experts"] == 4 * per_expert, counts["dense"] - counts["dense_active"] == 3 * per_expert
        (True, True)
    """
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, SparseArch) for p in m.parameters())
    experts = [m for m in model.modules() if isinstance(m, BatchedExperts)]
    counts = {
        "total": total,
        "embedding": embedding,
        "dense": total - embedding,
        "experts": sum(p.numel() for m in experts for p in m.parameters()),
    }
    if top_k is not None:
        inactive = 0
        for module in experts:
            per_expert = sum(p.numel() for p in module.parameters()) // module.num_experts
            inactive += per_expert * (module.num_experts - min(top_k, module.num_experts))
        counts["dense_active"] = counts["dense"] - inactive
    return counts


def parameter_report(model: nn.Module, cfg: ModelConfig, batch: Batch | None = None) -> dict[str, Any]:
    """Total, embedding, dense and active-per-sample parameter counts (:func:`count_parameters`).

    Active per sample = dense parameters a sample uses (for each MoE layer only K of its E experts) plus the
    embedding rows it looks up (ids per row in ``batch`` × their width; history counted once per group, as it is
    looked up once per group). Without a batch, only the dense part is reported.
    """
    counts = count_parameters(model, top_k=cfg.moe.top_k)
    report: dict[str, Any] = {
        "arch": cfg.arch.value,
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_dense": counts["dense"],
        "params_dense_active_per_sample": counts["dense_active"],
    }
    if batch is not None:
        ids = batch.sparse_features.values().numel() + batch.sequence_features.values().numel()
        rows_per_sample = ids / max(1, batch.batch_size)
        report["embedding_rows_per_sample"] = round(rows_per_sample, 2)
        report["params_active_per_sample"] = int(
            report["params_dense_active_per_sample"] + rows_per_sample * cfg.embedding_dim
        )
    return report


def tiny_schema_and_batch() -> tuple[Schema, Batch]:
    """A two-task toy schema and a 4-row batch (2 groups of 2), for examples and doctests."""
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "group_column": "g",
            "tables": [{"name": "user", "num_embeddings": 10}, {"name": "item", "num_embeddings": 20}],
            "sparse_features": [{"name": "user", "column": "u", "table": "user", "side": "user"}],
            "sequence_features": [
                {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "target_item", "column": "i", "table": "item"},
            ],
            "tasks": [
                {"name": "click", "type": "binary", "label": "y"},
                {"name": "rating", "type": "regression", "label": "r"},
            ],
        },
        source="tiny",
    )
    batch = Batch(
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            ["user"], torch.tensor([1, 1, 2, 2]), torch.tensor([1, 1, 1, 1])
        ),
        sequence_features=KeyedJaggedTensor.from_lengths_sync(
            ["history", "target_item"],
            torch.tensor([3, 4, 5, 6, 7, 8, 9, 10]),
            torch.tensor([3, 0, 1, 0, 1, 1, 1, 1]),
        ),
        dense_features=torch.zeros(4, 0),
        labels=torch.tensor([[1.0, 4.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]),
        task_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]),
        group_index=torch.tensor([0, 0, 1, 1]),
        user_index=torch.tensor([0, 0, 1, 1]),
    )
    return schema, batch
