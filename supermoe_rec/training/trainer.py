"""The main job: train any ``model.arch`` on 1..N processes with DistributedModelParallel and planned sharding.

    supermoe-rec train --config configs/ml100k.yaml [--train.epochs=3 ...]
    python -m supermoe_rec.training.trainer --config configs/ml100k.yaml
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
import logging
import os
import re
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
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from supermoe_rec.config.experiment import (
    ConfigError,
    ExperimentConfig,
    TaskType,
    check_early_stopping_metric,
    load_config,
    save_config,
    to_dict,
)
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.generative import apply_layout
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.output import atomic_output, json_safe, write_json
from supermoe_rec.data.splits import SplitData, load_data, load_run_data
from supermoe_rec.data.vocab import FILE_NAME as VOCAB_FILE
from supermoe_rec.data.vocab import save_vocabularies
from supermoe_rec.distributed.process_group import DistContext, init_distributed
from supermoe_rec.distributed.sharding import build_train_module, dense_optimizer, shard, sharding_constraints
from supermoe_rec.errors import run_reporting
from supermoe_rec.models.factory import build_model, parameter_report
from supermoe_rec.models.train_module import StepOutput
from supermoe_rec.modules.gating import bias_routers, update_router_biases
from supermoe_rec.modules.moe_stats import read_stats, set_collect_stats, tensorboard_scalars
from supermoe_rec.modules.transformer import token_kind_labels
from supermoe_rec.objectives.next_items import CandidateSource, resolve_softmax
from supermoe_rec.objectives.ranking import metrics_from_sums, rank_metric_sums
from supermoe_rec.training.checkpoint import CheckpointManager, TrainState
from supermoe_rec.training.memory import release_freed_memory
from supermoe_rec.training.metrics import MultiTaskEvaluator, primary_metric
from supermoe_rec.training.resume import Change, check_data, data_fingerprint
from supermoe_rec.training.rundir import guard_run

log = logging.getLogger("supermoe_rec.training.trainer")  # not __name__: that is "__main__" under python -m
# Steps (and eval batches) between returns of freed heap memory to the OS (supermoe_rec.training.memory); the interval
# trades peak RSS against speed, measured by benchmarks/train_memory.py.
RELEASE_MEMORY_EVERY = 50


# --------------------------------------------------------------------------------------------------- building


def label_means(data: SplitData) -> dict[str, float]:
    """Mean train label of each regression task: the towers' initial output bias (saves early steps)."""
    train = data.splits["train"]
    means = {}
    for j, task in enumerate(data.tasks):
        if task.type is TaskType.REGRESSION:
            labelled = train.task_mask[:, j] > 0
            means[task.name] = float(train.labels[labelled, j].mean()) if labelled.any() else 0.0
    return means


def next_items_frequency(data: SplitData) -> torch.Tensor | None:
    """Each item's share of the training split's future items (the next-items positives), for the logQ correction."""
    schema = data.schema
    table = schema.next_items_table()
    if table is None or schema.next_items is None:
        return None
    ids = data.splits["train"].features[schema.next_items].values
    counts = np.bincount(ids, minlength=table.num_embeddings)[: table.num_embeddings].astype(np.float64)
    counts[0] = 0.0
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()


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

    @property
    def state(self) -> TrainState:
        """What a checkpoint saves and loads: the model, the optimizer and the train loader (a DCP Stateful)."""
        if self._state is None:
            self._state = TrainState(self.dmp, self.optimizer, self.ctx.device, self.loaders.get("train"))
        return self._state

    _state: TrainState | None = field(default=None, init=False, repr=False)


def build_trainer(cfg: ExperimentConfig, ctx: DistContext, data: SplitData | None = None) -> Trainer:
    """Data, model on meta, sharding plan, DMP, fused sparse + dense optimizers.

    The building and sharding is :mod:`supermoe_rec.distributed.sharding`, shared with ``plan`` and ``export``.
    """
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    data = apply_layout(data if data is not None else load_data(cfg.data), cfg)
    if "train" not in data.splits:
        raise ConfigError("data: a train split is required")
    constraints = sharding_constraints(cfg.train.sharding, data.schema, ctx.device)
    # Tables on meta: DMP allocates each rank's shards. Dense modules on the device, seeded identically on all ranks.
    module = build_train_module(
        cfg,
        data.schema,
        device=ctx.device,
        world_size=ctx.world_size,
        output_bias=label_means(data),
        item_frequency=next_items_frequency(data),
    )
    # Under train.expert_parallel, shard() first swaps every MoE layer's experts for this rank's share of them.
    sharded = shard(module, cfg, data.schema, ctx.device, constraints=constraints)
    optimizer = dense_optimizer(sharded.dmp, cfg.train)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    example = next(iter(ShardedBatchLoader(data.splits["train"], cfg.train.batch_size, shuffle=False)))
    # Counted on an unsharded twin built on meta (free): the DMP module holds only this rank's shards.
    meta = torch.device("meta")
    params = parameter_report(build_model(cfg.model, data.schema, device=meta), cfg.model, example)
    trainer = Trainer(cfg, ctx, data, sharded.dmp, optimizer, sharded.plan, run_dir, params)
    table = data.schema.next_items_table()
    for split, ds in data.splits.items():
        batch_size = cfg.train.batch_size if split == "train" else cfg.train.eval_batch_size
        # Evaluation draws its candidates from another seed than training, the same at every evaluation.
        candidates = (
            CandidateSource(
                resolve_softmax(cfg.train.next_items, table.num_embeddings),
                table.num_embeddings,
                cfg.train.next_items.num_sampled,
                seed=cfg.train.seed + (0 if split == "train" else 1 + list(data.splits).index(split)),
            )
            if table is not None
            else None
        )
        trainer.loaders[split] = ShardedBatchLoader(
            ds, batch_size, ctx.rank, ctx.world_size, shuffle=split == "train", seed=cfg.train.seed,
            candidates=candidates,
        )  # fmt: skip
    return trainer


# ---------------------------------------------------------------------------------------------------- running


def _fmt(value: float) -> str:
    return f"{value:.4f}"


NEXT_ITEM_K = 10


def evaluate(trainer: Trainer, split: str, pipeline: TrainPipelineSparseDist) -> dict[str, Any]:
    """Per-task metrics on a split, exact over all ranks, and the loss as a row-weighted mean of batch losses.

    The loss is what early stopping reads by default; it weights each batch by its rows, so it is close to, not
    exactly, the task-indicator loss over the whole split (metrics are exact: predictions are gathered).
    """
    loader = trainer.loaders[split]
    loader.set_epoch(0)
    evaluator = MultiTaskEvaluator(trainer.data.tasks)
    loss_sum = torch.zeros(3, dtype=torch.float64)  # Σ rows·loss, Σ rows, Σ rows·next-items loss
    rank_sums = torch.zeros(4, dtype=torch.float64)  # next-item targets, hits@K, Σ NDCG@K, Σ MRR@K (rank_metric_sums)
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
            rows = out.labels.shape[0]
            next_items = float(out.loss.next_items) if out.loss.next_items is not None else 0.0
            loss_sum += torch.tensor([float(out.loss.total) * rows, rows, next_items * rows])
            if out.next_item_rank is not None:
                rank_sums += rank_metric_sums(out.next_item_rank.cpu(), NEXT_ITEM_K)
            batches += 1
            if batches % RELEASE_MEMORY_EVERY == 0:
                release_freed_memory()
    release_freed_memory()
    trainer.dmp.train()
    dist.all_reduce(loss_sum)
    dist.all_reduce(rank_sums)
    result: dict[str, Any] = {"loss": float(loss_sum[0] / max(1.0, float(loss_sum[1])))}
    if trainer.data.schema.next_items is not None:
        result["next_items_loss"] = float(loss_sum[2] / max(1.0, float(loss_sum[1])))
    if rank_sums[0] > 0:
        # Next-item retrieval over the whole catalogue (unmasked): each sample's next item ranked by its [USER].
        result["next_item"] = {**metrics_from_sums(rank_sums, NEXT_ITEM_K), "targets": int(rank_sums[0])}
    result["tasks"] = evaluator.compute()
    return result


def _early_stopping_value(cfg: ExperimentConfig, valid: dict[str, Any]) -> tuple[float, bool]:
    """(value, higher_is_better) of ``train.early_stopping_metric`` in a valid result."""
    name = cfg.train.early_stopping_metric
    if name == "loss":
        return float(valid["loss"]), False
    task, _, metric = name.partition(".")
    if task == "next_item" and metric in valid.get("next_item", {}):
        return float(valid["next_item"][metric]), True  # hr@K, ndcg@K, mrr@K: retrieval, higher is better
    if task not in valid["tasks"] or metric not in valid["tasks"][task]:
        raise ConfigError(
            f"train.early_stopping_metric: {name!r} is not a valid metric (use loss, task.metric or, with the "
            "next-items objective and a full softmax, next_item.ndcg@10 / hr@10 / mrr@10)"
        )
    return float(valid["tasks"][task][metric]), metric in ("auc", "gauc")


def train(cfg: ExperimentConfig, data: SplitData | None = None) -> dict[str, Any]:
    """Run the configured training and return what ``metrics.json`` holds.

    Before anything is written, rank 0 locks the run dir and a resume checks the config against the checkpoint's
    (:func:`supermoe_rec.training.rundir.guard_run`): a refused request leaves the run dir as it was.
    """
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.train.device)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    saved_config = CheckpointManager(run_dir / "checkpoints", cfg).saved_config
    with guard_run(cfg, run_dir, ctx.is_main, saved_config) as guard:
        return _train(cfg, ctx, data, guard.changes)


def _train(
    cfg: ExperimentConfig, ctx: DistContext, data: SplitData | None, resume_changes: list[Change]
) -> dict[str, Any]:
    start = time.monotonic()
    if data is None and (cfg.train.resume or cfg.train.init_from):
        # Ids map through the saved vocabularies of the run continued or fine-tuned from (docs/data.md).
        data = load_run_data(cfg.data, cfg.train.init_from or Path(cfg.train.out_dir) / cfg.train.name)
    elif data is None:
        data = load_data(cfg.data)
    check_early_stopping_metric(cfg.train.early_stopping_metric, [t.name for t in data.tasks])  # before any write
    check_trainable_tasks(data)
    fingerprint = data_fingerprint(data)
    if cfg.train.resume:  # before anything is written: a resume on other rows is refused (every rank alike)
        saved = CheckpointManager(Path(cfg.train.out_dir) / cfg.train.name / "checkpoints", cfg)
        check_data(*saved.saved_data_fingerprint(), fingerprint)
    trainer = build_trainer(cfg, ctx, data)
    run_dir = trainer.run_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Each through a temporary file renamed into place: a crash leaves the old file or the new one.
        with atomic_output(run_dir / "config.yaml") as part:
            save_config(cfg, part)
        if trainer.data.vocabularies:
            save_vocabularies(trainer.data.vocabularies, run_dir / VOCAB_FILE)  # atomic itself
        with atomic_output(run_dir / "plan.txt") as part:
            part.write_text(str(trainer.plan) + "\n")
        log.info("sharding plan:\n%s", trainer.plan)
        log.info("parameters: %s", trainer.params)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg, trainer.data.vocabularies, fingerprint)
    pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, ctx.device)
    writer = None
    if cfg.train.tensorboard and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))

    state: dict[str, Any] = {"epoch": 0, "step": 0, "batches_done": 0, "best": None, "best_epoch": -1,
                             "bad_epochs": 0, "history": [], "train_seconds": 0.0, "train_samples": 0}  # fmt: skip
    if cfg.train.resume:
        state = checkpoints.load(trainer.state, state)
        log.info("resumed from step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batches_done"])
    elif cfg.train.init_from:
        # Pretrain, then fine-tune: the pretrained run's best weights; optimizer states and data position start fresh
        # (its last one when it never validated, e.g. a run stopped by max_steps).
        source = Path(cfg.train.init_from).expanduser() / "checkpoints"
        tag = "best" if (source / "BEST").is_file() else "latest"
        CheckpointManager(source, cfg).restore_weights(trainer.state, tag)
        log.info("initialised the model from %s (%s checkpoint)", source, tag)
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
        balance_by_bias = bool(bias_routers(trainer.dmp))
        collecting = False
        while True:
            if cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps:
                stop = True
                pipeline.reset()  # drop prefetched batches, so evaluation starts clean
                break
            # MoE diagnostics (expert load, dead experts, inactive units, routing entropy) on the logged steps only.
            moe_stats_step = writer is not None and (state["step"] + 1) % cfg.train.log_every == 0
            if moe_stats_step != collecting:
                set_collect_stats(trainer.dmp, moe_stats_step)
                collecting = moe_stats_step
            try:
                out: StepOutput = pipeline.progress(iterator)
            except StopIteration:
                break
            if balance_by_bias:
                update_router_biases(trainer.dmp)  # load all-reduced over every rank: the biases stay replicated
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
                if out.loss.next_items is not None:
                    postfix["next"] = f"{out.loss.next_items.item():.3f}"
                postfix["drop%"] = f"{100 * float(out.model.dropped_fraction):.1f}"
                postfix["samples/s"] = f"{state['train_samples'] / max(state['train_seconds'], 1e-9):.0f}"
                bar.set_postfix(postfix, refresh=False)
            if writer is not None and state["step"] % cfg.train.log_every == 0:
                writer.add_scalar("train/loss", out.loss.total.item(), state["step"])
                for k, v in out.loss.per_task.items():
                    writer.add_scalar(f"train/{k}", v.item(), state["step"])
                writer.add_scalar("train/balance_loss", out.loss.balance_loss.item(), state["step"])
                writer.add_scalar("train/z_loss", out.loss.z_loss.item(), state["step"])
                if out.loss.next_items is not None:
                    writer.add_scalar("train/next_items_loss", out.loss.next_items.item(), state["step"])
                writer.add_scalar("train/dropped_fraction", float(out.model.dropped_fraction), state["step"])
                if moe_stats_step:
                    labels = token_kind_labels([t.name for t in trainer.data.tasks])
                    for name, value in tensorboard_scalars(read_stats(trainer.dmp, labels)).items():
                        writer.add_scalar(f"train/{name}", value, state["step"])
            if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0:
                checkpoints.save(trainer.state, state, tag=f"step{state['step']}")
        bar.close()
        if collecting:
            set_collect_stats(trainer.dmp, False)
        if stop and state["batches_done"] < len(train_loader):
            checkpoints.save(trainer.state, state, tag="last")
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
                checkpoints.save(trainer.state, state, tag="best")
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
        checkpoints.save(trainer.state, state, tag="last")

    if state["best_epoch"] > 0 and state["best_epoch"] != state["epoch"]:
        checkpoints.restore_weights(trainer.state, tag="best")
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
        # Hyper-parameters this resume changed, accepted by train.resume_allow_changes
        # (supermoe_rec/training/resume.py).
        "resume_changes": [c.as_dict() for c in resume_changes],
    }
    if "test" in trainer.loaders:
        result["test"] = evaluate(trainer, "test", pipeline)
    result["wall_s"] = time.monotonic() - start
    if ctx.is_main:
        undefined = [p for p in json_safe(result)[1] if p.startswith(("test.", "valid_history"))]
        if undefined:  # JSON has no NaN: such a metric is null, and the reason is recorded next to it
            result["undefined_metrics"] = {p: _undefined_reason(p) for p in undefined}
            log.warning("metrics not defined on their split (null in metrics.json): %s", ", ".join(undefined))
        write_json(run_dir / "metrics.json", result)
        if "test" in result:
            print(results_table(result["test"], trainer.data.tasks))
            if "next_item" in result["test"]:
                print("next item (test, whole catalogue, unmasked): " + _summary_line(
                    {"loss": result["test"]["next_items_loss"], "next_item": result["test"]["next_item"], "tasks": {}}
                ))  # fmt: skip
        if writer is not None:
            writer.close()
    return result


def interrupted_note(cfg: ExperimentConfig | None) -> str:
    """What an interrupted ``train`` kept and how to go on (the line Ctrl-C prints)."""
    if cfg is None:
        return "nothing was written"
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    latest = run_dir / "checkpoints" / "LATEST"
    if latest.is_file():
        ckpt = run_dir / "checkpoints" / latest.read_text().strip()
        return (
            f"the last checkpoint, {ckpt}, is kept (steps after it are lost); continue with the same command and "
            "--train.resume=true"
        )
    return f"no checkpoint was saved yet in {run_dir}; run the same command again to start over"


def _undefined_reason(path: str) -> str:
    """Why a metric at ``path`` (dotted, in metrics.json) is not a number."""
    metric = path.rsplit(".", 1)[-1]
    if metric in ("auc", "gauc"):
        return "the split's labels of this task are all of one class; AUC needs positives and negatives"
    return "the split has no labelled row of this task"


def check_trainable_tasks(data: SplitData) -> None:
    """Every task has a labelled row in the train split: a task with none would train nothing and still report
    test metrics."""
    train = data.splits.get("train")
    if train is None:
        return
    labelled = train.task_mask.sum(axis=0)
    for j, task in enumerate(data.tasks):
        if labelled[j] == 0:
            others = [t.name for t in data.tasks if t.name != task.name]
            raise DataError(
                train.source,
                f"task {task.name!r} has no labelled row in the train split (every label is missing, or masked out): "
                f"nothing would train it; fix its label column, or leave it out with --data.tasks=[{','.join(others)}]",
            )


def _metric_text(name: str, value: float) -> str:
    return str(int(value)) if name.endswith("users") else _fmt(value)


def _summary_line(result: dict[str, Any]) -> str:
    parts = [f"loss {_fmt(result['loss'])}"]
    if "next_items_loss" in result:
        parts.append(f"next_items_loss {_fmt(result['next_items_loss'])}")
    parts += [f"next_item.{k} {_fmt(v)}" for k, v in result.get("next_item", {}).items() if k != "targets"]
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
    parser.add_argument("--debug", action="store_true", help="print tracebacks of config, data and checkpoint errors")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for message in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=FutureWarning)
    logging.getLogger("supermoe_rec").setLevel(
        logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    )

    loaded: list[ExperimentConfig] = []

    def run() -> int:
        try:
            loaded.append(load_config(args.config, overrides))
            train(loaded[0])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0

    # One line and exit code 2 (config, data, refused request), 3 (checkpoint) or 130 (Ctrl-C): supermoe_rec/errors.py
    return run_reporting(run, args.debug, lambda: interrupted_note(loaded[0] if loaded else None))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Trainer", "build_trainer", "evaluate", "main", "train"]
