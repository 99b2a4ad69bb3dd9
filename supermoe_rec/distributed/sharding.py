"""Table sharding: the planner's constraints, the sparse optimizer, and building and sharding the train module.

One place for what the trainer (:func:`supermoe_rec.training.trainer.build_trainer`), the planner job
(:mod:`supermoe_rec.distributed.planner`),
the export job (:mod:`supermoe_rec.evaluation.export`) and the benchmarks share, so the plan a job prints is the one
training
makes:

- :func:`sharding_constraints`: per-table :class:`ParameterConstraints` from ``train.sharding`` (checked against the
  sharding types the device supports, :func:`sharding_types`); tables without a request are never
  ``data_parallel``;
- :func:`sparse_optimizer_class` / :func:`fuse_sparse_optimizer`: ``train.sparse_optimizer`` fused into the table
  weights' backward (``apply_optimizer_in_backward``), which is also how the planner's storage estimator learns the
  optimizer state per shard;
- :func:`build_train_module`: model + :class:`~supermoe_rec.objectives.task_indicator.TaskIndicatorLoss` as one
  :class:`~supermoe_rec.models.train_module.TrainModule`, tables on ``meta`` so DMP allocates only each rank's
  shards; with or without the fused sparse optimizer (export builds the model without optimizers);
- :func:`shard`: TorchRec's :class:`EmbeddingShardingPlanner` plans the tables over the process group, and
  :class:`DistributedModelParallel` shards them and wraps the dense part in DDP (expert-parallel experts excluded);
- :func:`dense_optimizer`: Adam over every parameter the fused optimizers do not own, combined with DMP's fused one.

Expert parallelism (``train.expert_parallel``) is :func:`supermoe_rec.distributed.expert_parallel.parallelize_experts`,
applied to the built model before :func:`shard`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from supermoe_rec.config.experiment import ConfigError, ExperimentConfig, SparseOptimizer, TrainConfig
from supermoe_rec.data.schema import Schema
from supermoe_rec.distributed.expert_parallel import expert_parallel_parameter_names, parallelize_experts
from supermoe_rec.models.factory import build_model
from supermoe_rec.models.train_module import TrainModule
from supermoe_rec.modules.embeddings import SparseArch
from supermoe_rec.objectives.next_items import build_next_items_loss
from supermoe_rec.objectives.task_indicator import TaskIndicatorLoss

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
ALL_SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise", "grid_shard")
META = torch.device("meta")

__all__ = [
    "ALL_SHARDING_TYPES",
    "CPU_SHARDING_TYPES",
    "ShardedModule",
    "build_train_module",
    "dense_optimizer",
    "fuse_sparse_optimizer",
    "shard",
    "sharders",
    "sharding_constraints",
    "sharding_types",
    "sparse_optimizer_class",
]


def sharding_types(device: torch.device) -> tuple[str, ...]:
    """The table sharding types available on ``device``: fbgemm has no CPU row-wise kernel."""
    return CPU_SHARDING_TYPES if device.type == "cpu" else ALL_SHARDING_TYPES


def sharding_constraints(
    sharding: Mapping[str, str], schema: Schema, device: torch.device
) -> dict[str, ParameterConstraints]:
    """Per-table constraints from ``train.sharding``; impossible requests fail here, before any work starts.

    Args:
        sharding: ``train.sharding``, table name -> sharding type.
        schema: the data schema (its tables).
        device: the compute device (decides which sharding types exist).

    Raises:
        ConfigError: an unknown table, or a sharding type the device does not support.
    """
    tables = {t.name for t in schema.tables}
    allowed = sharding_types(device)
    # Tables without a request are never data_parallel: DDP would replicate them and the dense Adam would train
    # them instead of train.sparse_optimizer, and the planner picks data_parallel or not depending on the world
    # size, so a run's optimizer semantics would change with it.
    sharded = [t for t in allowed if t != "data_parallel"]
    constraints = {t: ParameterConstraints(sharding_types=list(sharded)) for t in sorted(tables)}
    for table, sharding_type in sharding.items():
        if table not in tables:
            raise ConfigError(f"train.sharding.{table}: unknown table (known: {sorted(tables)})")
        if sharding_type not in allowed:
            why = " (row_wise needs CUDA: fbgemm has no CPU row-wise kernel)" if device.type == "cpu" else ""
            raise ConfigError(
                f"train.sharding.{table}: {sharding_type!r} is not available on {device.type}{why}; "
                f"choose one of {list(allowed)}"
            )
        constraints[table] = ParameterConstraints(sharding_types=[sharding_type])
    return constraints


def sparse_optimizer_class(kind: SparseOptimizer) -> type[torch.optim.Optimizer]:
    """The optimizer class fused into the tables' backward for ``train.sparse_optimizer``."""
    import torchrec.optim as trec_optim

    optimizers: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
        SparseOptimizer.ROWWISE_ADAGRAD: trec_optim.RowWiseAdagrad,
        SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
        SparseOptimizer.ADAM: torch.optim.Adam,
        SparseOptimizer.SGD: torch.optim.SGD,
    }
    return optimizers[kind]


def fuse_sparse_optimizer(sparse_arch: SparseArch, train: TrainConfig) -> None:
    """Fuse ``train.sparse_optimizer`` (lr ``train.sparse_lr``) into the table weights' backward.

    This tags each table weight with its optimizer class, which is what the sharders turn into fbgemm's fused
    update and what the planner's storage estimator reads to add the optimizer state to every shard.
    """
    kwargs: dict[str, Any] = {"lr": train.sparse_lr}
    if train.sparse_optimizer is SparseOptimizer.ADAGRAD:
        kwargs["eps"] = 1e-8
    apply_optimizer_in_backward(sparse_optimizer_class(train.sparse_optimizer), sparse_arch.parameters(), kwargs)


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders of the two table collections :class:`SparseArch` may hold."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]


def build_train_module(
    cfg: ExperimentConfig,
    schema: Schema,
    device: torch.device | None = None,
    sparse_device: torch.device | None = META,
    world_size: int = 1,
    output_bias: Mapping[str, float] | None = None,
    optimizers: bool = True,
    item_frequency: torch.Tensor | None = None,
) -> TrainModule:
    """``cfg``'s model and task-indicator loss as one :class:`TrainModule`, ready for :func:`shard`.

    Args:
        cfg: the run's config.
        schema: the data schema (features, tables, tasks).
        device: where the dense modules are built (and initialised, from the current RNG state).
        sparse_device: where the tables are built; ``meta`` (default) lets DMP allocate only each rank's shards.
        world_size: ranks the loss is normalised over (see :class:`TaskIndicatorLoss`); also sets the tables'
            ``grad_scale`` to ``1 / world_size``.
        output_bias: initial output bias per task (e.g. the mean train label of a regression task).
        optimizers: fuse ``train.sparse_optimizer`` into the tables' backward; ``False`` builds the model alone
            (inference, export).
        item_frequency: each item's share of the training positives, for the next-items loss's in-batch logQ
            correction (schemas with ``next_items``; uniform when omitted).
    """
    model = build_model(
        cfg.model,
        schema,
        device=device,
        sparse_device=sparse_device,
        max_history=cfg.data.max_history,
        output_bias=output_bias,
    )
    loss = cfg.train.loss
    loss_fn = TaskIndicatorLoss(
        schema.task_specs(),
        task_weights=cfg.trained_task_weights(),
        uncertainty_weighting=loss.uncertainty_weighting,
        regression_loss=loss.regression_loss,
        huber_delta=loss.huber_delta,
        balance_loss_weight=loss.balance_loss_weight,
        z_loss_weight=loss.z_loss_weight,
        global_normalization=world_size > 1,
        device=device,
    )
    next_items_table = schema.next_items_table()
    next_items_loss = (
        build_next_items_loss(cfg.train.next_items, next_items_table.num_embeddings, item_frequency, world_size)
        if next_items_table is not None
        else None
    )
    module = TrainModule(model, loss_fn, next_items_loss, cfg.train.objective, cfg.train.next_items.weight)
    sparse_arch = model.sparse_arch
    assert isinstance(sparse_arch, SparseArch)
    sparse_arch.grad_scale = 1.0 / world_size
    if optimizers:
        fuse_sparse_optimizer(sparse_arch, cfg.train)
    return module


@dataclass(frozen=True)
class ShardedModule:
    """What :func:`shard` returns: the DMP-wrapped module and the plan it was sharded with."""

    dmp: DistributedModelParallel
    plan: ShardingPlan


def shard(
    module: TrainModule,
    cfg: ExperimentConfig,
    schema: Schema,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    constraints: Mapping[str, ParameterConstraints] | None = None,
) -> ShardedModule:
    """Plan ``module``'s tables over ``group`` and shard them with DistributedModelParallel (collective).

    Under ``train.expert_parallel`` the experts are split over the group first
    (:func:`~supermoe_rec.distributed.expert_parallel.parallelize_experts`) and kept out of DDP, which would
    otherwise overwrite every rank's experts with rank 0's and average their gradients.

    Args:
        module: from :func:`build_train_module`.
        cfg: the run's config (``train.sharding``, ``train.expert_parallel``).
        schema: the data schema (its tables, for the constraints).
        device: this rank's compute device.
        group: the process group (``None``: the default group).
        constraints: precomputed :func:`sharding_constraints` (default: computed here).
    """
    pg = group if group is not None else dist.group.WORLD
    assert pg is not None
    world_size = dist.get_world_size(pg)
    if constraints is None:
        constraints = sharding_constraints(cfg.train.sharding, schema, device)
    if cfg.train.expert_parallel:
        parallelize_experts(module, pg)
    ignore = expert_parallel_parameter_names(module)
    planner = EmbeddingShardingPlanner(
        # Ranks per host: torchrun sets LOCAL_WORLD_SIZE; without it the planner would price cross-host traffic as
        # if every rank shared one machine.
        topology=Topology(
            world_size=world_size,
            compute_device=device.type,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        ),
        constraints=dict(constraints),
    )
    table_sharders = sharders()
    plan = planner.collective_plan(module, table_sharders, pg)
    dmp = DistributedModelParallel(
        module=module,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=table_sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=ignore),
    )
    return ShardedModule(dmp, plan)


def dense_optimizer(dmp: DistributedModelParallel, train: TrainConfig) -> CombinedOptimizer:
    """Adam (``train.lr``, ``train.weight_decay``) over the parameters no fused optimizer owns, combined with DMP's
    fused sparse optimizer: the one optimizer a training step (and a checkpoint) sees."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense])
