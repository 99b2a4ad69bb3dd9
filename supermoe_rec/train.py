"""The main job: train any ``model.arch`` on 1..N processes with DistributedModelParallel and planned sharding.

    supermoe-rec train --config configs/ml100k.yaml [--train.epochs=3 ...]
    python -m supermoe_rec.train --config configs/ml100k.yaml
    torchrun / torchx run ... (one process per rank; RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher)

Per run, in ``<train.out_dir>/<train.name>/``: ``config.yaml`` (resolved), ``plan.txt`` (the sharding plan),
``metrics.json`` (test metrics per task, valid history, parameters, speed), ``checkpoints/`` and ``tb/``
(TensorBoard).

Gradient convention (exact across world sizes): each rank's loss is world_size x its share of the global loss
(:class:`TaskIndicatorLoss` with global normalisation); DDP averages dense gradients, and TorchRec's sharded tables
average theirs too (its gradient division, on by default; were it off, SparseArch.grad_scale supplies the
1/world_size). Every parameter then receives the gradient of the loss on the global batch, whatever the world size
(tests/distributed/test_dmp_equivalence.py checks this with SGD, which would expose any stray factor).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tabulate import tabulate
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from supermoe_rec.checkpoint import CheckpointError, CheckpointManager
from supermoe_rec.config import (
    ConfigError,
    ExperimentConfig,
    SparseOptimizer,
    TaskType,
    load_config,
    save_config,
    to_dict,
)
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.loss import TaskIndicatorLoss
from supermoe_rec.memory import release_freed_memory
from supermoe_rec.metrics import MultiTaskEvaluator, primary_metric
from supermoe_rec.models.factory import build_model, parameter_report
from supermoe_rec.models.train_module import StepOutput, TrainModule
from supermoe_rec.modules.embeddings import SparseArch

log = logging.getLogger("supermoe_rec.train")  # not __name__: that is "__main__" under python -m
# Steps (and eval batches) between returns of freed heap memory to the OS (supermoe_rec.memory); the interval
# trades peak RSS against speed, measured by benchmarks/train_memory.py.
RELEASE_MEMORY_EVERY = 50

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
ALL_SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise", "grid_shard")


# ----------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device_name: str) -> DistContext:
    """Join (or, for a plain single process, create) the process group: gloo on CPU, nccl on GPU."""
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {device_name!r} is not one of ['auto', 'cpu', 'cuda']")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no GPU is visible")
    if "RANK" not in os.environ:  # a plain `python -m supermoe_rec.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


# --------------------------------------------------------------------------------------------------- planning


def sharding_constraints(
    cfg: ExperimentConfig, data: SplitData, device: torch.device
) -> dict[str, ParameterConstraints]:
    """Per-table constraints from ``train.sharding``; impossible requests fail here, before any work starts."""
    tables = {t.name for t in data.schema.tables}
    allowed = CPU_SHARDING_TYPES if device.type == "cpu" else ALL_SHARDING_TYPES
    # Tables without a request are never data_parallel: DDP would replicate them and the dense Adam would train
    # them instead of train.sparse_optimizer, and the planner picks data_parallel or not depending on the world
    # size, so a run's optimizer semantics would change with it.
    sharded = [t for t in allowed if t != "data_parallel"]
    constraints = {t: ParameterConstraints(sharding_types=list(sharded)) for t in sorted(tables)}
    for table, sharding_type in cfg.train.sharding.items():
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


def _sparse_optimizer(kind: SparseOptimizer) -> type[torch.optim.Optimizer]:
    import torchrec.optim as trec_optim

    optimizers: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
        SparseOptimizer.ROWWISE_ADAGRAD: trec_optim.RowWiseAdagrad,
        SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
        SparseOptimizer.ADAM: torch.optim.Adam,
        SparseOptimizer.SGD: torch.optim.SGD,
    }
    return optimizers[kind]


def label_means(data: SplitData) -> dict[str, float]:
    """Mean train label of each regression task: the towers' initial output bias (saves early steps)."""
    train = data.splits["train"]
    means = {}
    for j, task in enumerate(data.tasks):
        if task.type is TaskType.REGRESSION:
            labelled = train.task_mask[:, j] > 0
            means[task.name] = float(train.labels[labelled, j].mean()) if labelled.any() else 0.0
    return means


@dataclass
class Trainer:
    """Everything a run holds: the sharded model, optimizer, pipeline, loaders and bookkeeping."""

    cfg: ExperimentConfig
    ctx: DistContext
    data: SplitData
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: ShardingPlan
    run_dir: Path
    params: dict[str, Any]
    loaders: dict[str, ShardedBatchLoader] = field(default_factory=dict)


def build_trainer(cfg: ExperimentConfig, ctx: DistContext, data: SplitData | None = None) -> Trainer:
    """Data, model on meta, sharding plan, DMP, fused sparse + dense optimizers."""
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    data = data if data is not None else load_data(cfg.data)
    if "train" not in data.splits:
        raise ConfigError("data: a train split is required")
    constraints = sharding_constraints(cfg, data, ctx.device)
    meta = torch.device("meta")
    # Tables on meta: DMP allocates each rank's shards. Dense modules on the device, seeded identically on all ranks.
    model = build_model(
        cfg.model,
        data.schema,
        device=ctx.device,
        sparse_device=meta,
        max_history=cfg.data.max_history,
        output_bias=label_means(data),
    )
    loss_fn = TaskIndicatorLoss(
        data.tasks,
        task_weights=cfg.trained_task_weights(),
        uncertainty_weighting=cfg.train.uncertainty_weighting,
        regression_loss=cfg.train.regression_loss,
        huber_delta=cfg.train.huber_delta,
        balance_loss_weight=cfg.model.moe.balance_loss_weight,
        z_loss_weight=cfg.model.moe.z_loss_weight,
        global_normalization=ctx.world_size > 1,
    )
    module = TrainModule(model, loss_fn)
    sparse_arch = model.sparse_arch
    assert isinstance(sparse_arch, SparseArch)
    sparse_arch.grad_scale = 1.0 / ctx.world_size

    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    sparse_kwargs: dict[str, Any] = {"lr": cfg.train.sparse_lr}
    if cfg.train.sparse_optimizer is SparseOptimizer.ADAGRAD:
        sparse_kwargs["eps"] = 1e-8
    apply_optimizer_in_backward(_sparse_optimizer(cfg.train.sparse_optimizer), sparse_arch.parameters(), sparse_kwargs)
    sharders: list[ModuleSharder[nn.Module]] = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]
    pg = dist.group.WORLD
    assert pg is not None
    planner = EmbeddingShardingPlanner(
        # Ranks per host: torchrun sets LOCAL_WORLD_SIZE; without it the planner would price cross-host traffic as
        # if every rank shared one machine.
        topology=Topology(
            world_size=ctx.world_size,
            compute_device=ctx.device.type,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)),
        ),
        constraints=constraints,
    )
    plan = planner.collective_plan(module, sharders, pg)
    ignore = []
    if cfg.model.moe.expert_parallel:
        from supermoe_rec.distributed.expert_parallel import expert_parallel_parameter_names

        ignore = expert_parallel_parameter_names(module)
    dmp = DistributedModelParallel(
        module=module,
        env=ShardingEnv.from_process_group(pg),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=ignore),
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    example = next(iter(ShardedBatchLoader(data.splits["train"], cfg.train.batch_size, shuffle=False)))
    # Counted on an unsharded twin built on meta (free): the DMP module holds only this rank's shards.
    params = parameter_report(build_model(cfg.model, data.schema, device=meta), cfg.model, example)
    trainer = Trainer(cfg, ctx, data, dmp, optimizer, plan, run_dir, params)
    for split, ds in data.splits.items():
        batch_size = cfg.train.batch_size if split == "train" else cfg.train.eval_batch_size
        trainer.loaders[split] = ShardedBatchLoader(
            ds, batch_size, ctx.rank, ctx.world_size, shuffle=split == "train", seed=cfg.train.seed
        )
    return trainer


# ---------------------------------------------------------------------------------------------------- running


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def evaluate(trainer: Trainer, split: str, pipeline: TrainPipelineSparseDist) -> dict[str, Any]:
    """Per-task metrics on a split, exact over all ranks, and the loss as a row-weighted mean of batch losses.

    The loss is what early stopping reads by default; it weights each batch by its rows, so it is close to, not
    exactly, the task-indicator loss over the whole split (metrics are exact: predictions are gathered).
    """
    loader = trainer.loaders[split]
    loader.set_epoch(0)
    evaluator = MultiTaskEvaluator(trainer.data.tasks)
    loss_sum = torch.zeros(2, dtype=torch.float64)
    trainer.dmp.eval()
    iterator = iter(loader)
    batches = 0
    with torch.no_grad():
        while True:
            try:
                out: StepOutput = pipeline.progress(iterator)
            except StopIteration:
                break
            evaluator.update(out.model.predictions, out.labels, out.task_mask, out.user_index)
            loss_sum += torch.tensor([float(out.loss.total) * out.labels.shape[0], out.labels.shape[0]])
            batches += 1
            if batches % RELEASE_MEMORY_EVERY == 0:
                release_freed_memory()
    release_freed_memory()
    trainer.dmp.train()
    dist.all_reduce(loss_sum)
    result: dict[str, Any] = {"loss": float(loss_sum[0] / max(1.0, float(loss_sum[1])))}
    result["tasks"] = evaluator.compute()
    return result


def _early_stopping_value(cfg: ExperimentConfig, valid: dict[str, Any]) -> tuple[float, bool]:
    """(value, higher_is_better) of ``train.early_stopping_metric`` in a valid result."""
    name = cfg.train.early_stopping_metric
    if name == "loss":
        return float(valid["loss"]), False
    task, _, metric = name.partition(".")
    if task not in valid["tasks"] or metric not in valid["tasks"][task]:
        raise ConfigError(f"train.early_stopping_metric: {name!r} is not a valid metric (use loss or task.metric)")
    return float(valid["tasks"][task][metric]), metric in ("auc", "gauc")


def train(cfg: ExperimentConfig, data: SplitData | None = None) -> dict[str, Any]:
    """Run the configured training and return what ``metrics.json`` holds."""
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.train.device)
    start = time.monotonic()
    trainer = build_trainer(cfg, ctx, data)
    run_dir = trainer.run_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "plan.txt").write_text(str(trainer.plan) + "\n")
        log.info("sharding plan:\n%s", trainer.plan)
        log.info("parameters: %s", trainer.params)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg)
    pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, ctx.device)
    writer = None
    if cfg.train.tensorboard and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))

    state: dict[str, Any] = {"epoch": 0, "step": 0, "batches_done": 0, "best": None, "best_epoch": -1,
                             "bad_epochs": 0, "history": [], "train_seconds": 0.0, "train_samples": 0}  # fmt: skip
    if cfg.train.resume:
        state = checkpoints.load(trainer, state)
        log.info("resumed from step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batches_done"])
    train_loader = trainer.loaders["train"]
    recent_loss: deque[float] = deque(maxlen=50)  # for the report only; not part of the resumable state
    stop = False
    while state["epoch"] < cfg.train.epochs and not stop:
        train_loader.set_epoch(state["epoch"])
        train_loader.batches_done = state["batches_done"]
        iterator: Iterator[Any] = iter(train_loader)
        bar = tqdm(
            total=len(train_loader),
            initial=state["batches_done"],
            desc=f"epoch {state['epoch']}",
            disable=not ctx.is_main,
            dynamic_ncols=True,
        )
        tick = time.monotonic()
        while True:
            if cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps:
                stop = True
                pipeline.reset()  # drop prefetched batches, so evaluation starts clean
                break
            try:
                out: StepOutput = pipeline.progress(iterator)
            except StopIteration:
                break
            state["step"] += 1
            state["batches_done"] += 1
            if state["step"] % RELEASE_MEMORY_EVERY == 0:
                release_freed_memory()  # batch sizes vary: freed heap blocks would otherwise stay resident
            rows = int(out.labels.shape[0]) * ctx.world_size
            state["train_samples"] += rows
            recent_loss.append(out.loss.total.item())
            now = time.monotonic()
            state["train_seconds"] += now - tick
            tick = now
            bar.update(1)
            if state["step"] % 10 == 0 or state["step"] == 1:
                postfix = {k: f"{v.item():.3f}" for k, v in out.loss.per_task.items()}
                postfix["bal"] = f"{out.loss.balance_loss.item():.3f}"
                postfix["z"] = f"{out.loss.z_loss.item():.2f}"
                postfix["drop%"] = f"{100 * float(out.model.dropped_fraction):.1f}"
                postfix["samples/s"] = f"{state['train_samples'] / max(state['train_seconds'], 1e-9):.0f}"
                bar.set_postfix(postfix, refresh=False)
            if writer is not None and state["step"] % cfg.train.log_every == 0:
                writer.add_scalar("train/loss", out.loss.total.item(), state["step"])
                for k, v in out.loss.per_task.items():
                    writer.add_scalar(f"train/{k}", v.item(), state["step"])
                writer.add_scalar("train/balance_loss", out.loss.balance_loss.item(), state["step"])
                writer.add_scalar("train/z_loss", out.loss.z_loss.item(), state["step"])
                writer.add_scalar("train/dropped_fraction", float(out.model.dropped_fraction), state["step"])
            if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0:
                checkpoints.save(trainer, state, tag=f"step{state['step']}")
        bar.close()
        if stop and state["batches_done"] < len(train_loader):
            checkpoints.save(trainer, state, tag="last")
            break  # max_steps reached mid-epoch: no epoch-end evaluation
        valid = evaluate(trainer, "valid", pipeline) if "valid" in trainer.loaders else None
        state["epoch"] += 1
        state["batches_done"] = 0
        if valid is not None:
            valid["epoch"] = state["epoch"]
            state["history"].append(valid)
            value, higher = _early_stopping_value(cfg, valid)
            improved = state["best"] is None or (value > state["best"] if higher else value < state["best"])
            if improved:
                state["best"], state["best_epoch"], state["bad_epochs"] = value, state["epoch"], 0
                checkpoints.save(trainer, state, tag="best")
            else:
                state["bad_epochs"] += 1
            if ctx.is_main:
                log.info("epoch %d valid: %s", state["epoch"], _summary_line(valid))
                if writer is not None:
                    writer.add_scalar("valid/loss", valid["loss"], state["epoch"])
                    for task, metrics in valid["tasks"].items():
                        for metric, v in metrics.items():
                            writer.add_scalar(f"valid/{task}.{metric}", v, state["epoch"])
            if state["bad_epochs"] >= cfg.train.early_stopping_patience:
                log.info("early stopping: no improvement in %d epoch(s)", state["bad_epochs"])
                stop = True
        checkpoints.save(trainer, state, tag="last")

    if state["best_epoch"] > 0 and state["best_epoch"] != state["epoch"]:
        checkpoints.restore_weights(trainer, tag="best")
    result: dict[str, Any] = {
        "config": to_dict(cfg),
        "world_size": ctx.world_size,
        "steps": state["step"],
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "valid_history": state["history"],
        "params": trainer.params,
        "train_samples_per_s": state["train_samples"] / max(state["train_seconds"], 1e-9),
        # Mean training loss of this rank's last (up to) 50 steps: world_size x its share of the global loss.
        "train_loss_recent": sum(recent_loss) / max(1, len(recent_loss)),
    }
    if "test" in trainer.loaders:
        result["test"] = evaluate(trainer, "test", pipeline)
    result["wall_s"] = time.monotonic() - start
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if "test" in result:
            print(results_table(result["test"], trainer.data.tasks))
        if writer is not None:
            writer.close()
    return result


def _metric_text(name: str, value: float) -> str:
    return str(int(value)) if name.endswith("users") else _fmt(value)


def _summary_line(result: dict[str, Any]) -> str:
    parts = [f"loss {_fmt(result['loss'])}"]
    for task, metrics in result["tasks"].items():
        parts += [f"{task}.{k} {_metric_text(k, v)}" for k, v in metrics.items() if k != "count"]
    return ", ".join(parts)


def results_table(result: dict[str, Any], tasks: Sequence[Any]) -> str:
    """The final per-task table printed at the end of a run."""
    rows = []
    for task in tasks:
        metrics = result["tasks"][task.name]
        main, _ = primary_metric(task)
        others = ", ".join(f"{k} {_metric_text(k, v)}" for k, v in metrics.items() if k not in (main, "count"))
        rows.append([task.name, task.type.value, main, _fmt(metrics[main]), others, int(metrics["count"])])
    table: str = tabulate(rows, headers=["task", "type", "metric", "test", "also", "labelled"], tablefmt="github")
    return table


# Deprecation notices from TorchRec/DCP internals that a user of this command cannot act on.
_LIBRARY_NOISE = (
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "HeuristicalStorageReservation is known to cause issues",
    "`broadcast_buffers` is deprecated",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supermoe-rec train", description="Train model.arch on the configured data.")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for message in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=FutureWarning)
    logging.getLogger("supermoe_rec").setLevel(
        logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    )
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except ConfigError as exc:
        print(f"supermoe-rec: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # resume from a missing, incomplete or corrupt checkpoint: never from scratch
        print(f"supermoe-rec: checkpoint error: {exc}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DistContext", "Trainer", "build_trainer", "evaluate", "init_distributed", "main", "train"]
