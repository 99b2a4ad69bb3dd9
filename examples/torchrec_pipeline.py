"""Add SUPERMOE's blocks to a stock TorchRec model, shard it with DMP and train it with TrainPipelineSparseDist.

    .venv/bin/python examples/torchrec_pipeline.py --steps 20
    PATH="$PWD/.venv/bin:$PATH" .venv/bin/torchx run -s local_cwd dist.ddp -j 1x1 \
        --script examples/torchrec_pipeline.py -- --steps 5

The stock part is DLRM-shaped and uses only TorchRec: an EmbeddingBagCollection (user id, candidate item id), and
TorchRec's DLRM DenseArch, InteractionArch and OverArch. SUPERMOE adds three blocks:

1. an EmbeddingCollection (still plain TorchRec) looks up the user's history, giving a JaggedTensor per row;
2. :class:`supermoe_rec.MoETransformerEncoder` encodes it (:func:`supermoe_rec.encode_jagged` pads the jagged
   embeddings), conditioned on the user embedding, into one representation per task;
3. :class:`supermoe_rec.MultiTaskTowers` read [task representation, DLRM output] and
   :class:`supermoe_rec.TaskIndicatorLoss` trains the tasks together, each over its own labelled rows (``like`` and
   ``watch_time`` exist only for clicked rows), plus the MoE balance and router z-losses.

No supermoe_rec data classes are used: batches are a small ``Pipelineable`` dataclass of KeyedJaggedTensors and
tensors from a synthetic generator with a planted signal (a user's taste shows in their history).

**Tracing.** TorchRec's pipeline fx-traces the top module to find the sharded modules' inputs. So the top module's
forward only calls the two tables on fields of the batch and hands everything else to one table-free submodule
(:class:`HybridOverArch`), which the tracer treats as an opaque leaf: its data-dependent code (padding to the longest
history, the MoE's routing) never meets the tracer.

Dimension letters: B rows, L longest history, D embedding dim, M model dim, T tasks, F sparse features, O DLRM
over-arch width.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _shared import out_dir, quiet  # examples/ is on sys.path: run as a script, or from the notebooks
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Pipelineable

from supermoe_rec import (
    EncoderConfig,
    LossConfig,
    LossOutput,
    ModelConfig,
    MoEConfig,
    MoETransformerEncoder,
    MultiTaskTowers,
    TaskIndicatorLoss,
    TaskSpec,
    TaskType,
    encode_jagged,
)
from supermoe_rec.distributed.process_group import init_distributed

TASKS = (
    TaskSpec("click", TaskType.BINARY),  # every row
    TaskSpec("like", TaskType.BINARY),  # clicked rows only
    TaskSpec("watch_time", TaskType.REGRESSION),  # clicked rows only
)
SPARSE_FEATURES = ("user_id", "item_id")


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class SyntheticBatch(Pipelineable):
    """One batch as a TorchRec pipeline moves it (``to``, ``record_stream``, ``pin_memory``).

    Attributes:
        dense: [B, 4] float dense features.
        sparse: KJT with ``user_id`` and ``item_id``, one id per row (stride B).
        history: KJT with ``history``, the user's past item ids, oldest first (0 to ``max_history`` per row).
        labels: [B, T] in :data:`TASKS` order; 0 where unlabelled.
        task_mask: [B, T] 1 where row i carries a label for task t.
    """

    dense: Tensor
    sparse: KeyedJaggedTensor
    history: KeyedJaggedTensor
    labels: Tensor
    task_mask: Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> SyntheticBatch:
        return SyntheticBatch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            history=self.history.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            task_mask=self.task_mask.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.history.record_stream(stream)
        for t in (self.dense, self.labels, self.task_mask):
            t.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> SyntheticBatch:
        return SyntheticBatch(
            self.dense.pin_memory(),
            self.sparse.pin_memory(),
            self.history.pin_memory(),
            self.labels.pin_memory(),
            self.task_mask.pin_memory(),
        )


@dataclass(frozen=True)
class DataSpec:
    """Sizes of the synthetic world."""

    num_users: int = 500
    num_items: int = 400
    num_genres: int = 4
    max_history: int = 20
    num_dense: int = 4


def synthetic_batches(spec: DataSpec, batch_size: int, seed: int) -> Iterator[SyntheticBatch]:
    """An endless, seeded stream of batches with a planted signal.

    Every user likes one genre (``user % num_genres``) and item i has genre ``i % num_genres``. 80% of a user's
    history is from their genre, so the history reveals the taste; ``match`` is 1 when the candidate is of it.

    - ``click`` (every row): Bernoulli(sigmoid(2·dense_0 + 2.5·match − 1.5));
    - ``like`` (clicked rows): Bernoulli(sigmoid(2·dense_1 + 1.5·[item % 3 != 0] − 0.75));
    - ``watch_time`` (clicked rows): 1 + 2·match + 0.5·dense_2 + N(0, 0.3²).

    The dense terms are learned within a few dozen steps; the match terms need the history and more steps.
    """
    g = torch.Generator().manual_seed(seed)
    G = spec.num_genres
    while True:
        users = torch.randint(spec.num_users, (batch_size,), generator=g)  # (B,)
        items = torch.randint(spec.num_items, (batch_size,), generator=g)  # (B,)
        lengths = torch.randint(0, spec.max_history + 1, (batch_size,), generator=g)  # (B,)
        n = int(lengths.sum())
        owner = torch.repeat_interleave(users, lengths)  # (N,) the user of each history item
        on_taste = torch.rand(n, generator=g) < 0.8
        genre = torch.where(on_taste, owner % G, torch.randint(G, (n,), generator=g))  # (N,)
        history = genre + G * torch.randint(spec.num_items // G, (n,), generator=g)  # (N,) an item of that genre
        match = (items % G == users % G).float()  # (B,)
        dense = torch.randn(batch_size, spec.num_dense, generator=g)  # (B, F_dense)
        click = torch.bernoulli(torch.sigmoid(2.0 * dense[:, 0] + 2.5 * match - 1.5), generator=g)
        quality = (items % 3 != 0).float()
        like = torch.bernoulli(torch.sigmoid(2.0 * dense[:, 1] + 1.5 * quality - 0.75), generator=g)
        watch = 1.0 + 2.0 * match + 0.5 * dense[:, 2] + 0.3 * torch.randn(batch_size, generator=g)
        labels = torch.stack([click, like * click, watch * click], dim=1)  # (B, T) 0 where unlabelled
        task_mask = torch.stack([torch.ones(batch_size), click, click], dim=1)  # (B, T)
        yield SyntheticBatch(
            dense=dense,
            sparse=KeyedJaggedTensor.from_lengths_sync(
                list(SPARSE_FEATURES), torch.cat([users, items]), torch.ones(2 * batch_size, dtype=torch.int32)
            ),
            history=KeyedJaggedTensor.from_lengths_sync(["history"], history, lengths.int()),
            labels=labels,
            task_mask=task_mask,
        )


# ----------------------------------------------------------------------------------------------------- model


@dataclass
class StepResult:
    """What the model returns next to the loss (and ``TrainPipelineSparseDist.progress`` returns).

    Attributes:
        loss: the :class:`~supermoe_rec.LossOutput` (per-task losses, labelled counts, MoE losses).
        predictions: task name -> [B] detached logits / values.
        labels, task_mask: [B, T], so metrics can be computed from the step output alone.
        tokens_per_expert: [MoE layers, E] routed assignments of this step.
    """

    loss: LossOutput
    predictions: dict[str, Tensor]
    labels: Tensor
    task_mask: Tensor
    tokens_per_expert: Tensor


class HybridOverArch(nn.Module):
    """Everything above the tables, and no table: stock DLRM arches + SUPERMOE encoder, towers and loss.

    Args:
        tasks: the T tasks (column order of labels and task mask).
        embedding_dim: D of every table.
        num_dense: dense features per row.
        encoder_config: shape of the SUPERMOE encoder (M = ``encoder_config.encoder.d_model``).
        over_dim: O, the DLRM over-arch output width.
        device: where the parameters live.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        embedding_dim: int,
        num_dense: int,
        encoder_config: ModelConfig,
        over_dim: int = 32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        D, F, M = embedding_dim, len(SPARSE_FEATURES), encoder_config.encoder.d_model
        # Stock DLRM: dense MLP to D, pairwise dot interactions with the F pooled embeddings, over MLP to O.
        self.dense_arch = DenseArch(num_dense, [32, D], device=device)
        self.interaction = InteractionArch(num_sparse_features=F)
        self.over_arch = OverArch(D + F + F * (F - 1) // 2, [64, over_dim], device=device)
        # SUPERMOE: the user embedding conditions the [USER]/task tokens; the history is the token sequence.
        self.context = nn.Linear(D, M, device=device)
        self.encoder = MoETransformerEncoder(encoder_config, num_tasks=len(tasks), input_dim=D, device=device)
        self.towers = MultiTaskTowers(tasks, in_features=M + over_dim, hidden=[32], device=device)
        loss = LossConfig()  # the default MoE loss weights
        # global_normalization: under a world > 1, every task is averaged over its labelled rows on all ranks.
        self.loss_fn = TaskIndicatorLoss(
            tasks,
            balance_loss_weight=loss.balance_loss_weight,
            z_loss_weight=loss.z_loss_weight,
            global_normalization=True,
        )

    def forward(
        self, pooled: KeyedTensor, sequences: dict[str, JaggedTensor], batch: SyntheticBatch
    ) -> tuple[Tensor, StepResult]:
        """Returns: the scalar loss and the :class:`StepResult` (predictions [B] per task)."""
        sparse = torch.stack([pooled[name] for name in SPARSE_FEATURES], dim=1)  # (B, F, D)
        dlrm = self.over_arch(self.interaction(self.dense_arch(batch.dense), sparse))  # (B, O)
        context = self.context(pooled["user_id"])  # (B, M)
        enc = encode_jagged(self.encoder, sequences["history"], context)  # tasks (B, T, M)
        inputs = {t.name: torch.cat([enc.tasks[:, i], dlrm], dim=1) for i, t in enumerate(self.towers.tasks)}
        predictions = self.towers(inputs)  # task -> (B,)
        loss = self.loss_fn(predictions, batch.labels, batch.task_mask, enc.balance_loss, enc.z_loss)
        result = StepResult(
            loss=loss,
            predictions={k: v.detach() for k, v in predictions.items()},
            labels=batch.labels,
            task_mask=batch.task_mask,
            tokens_per_expert=enc.tokens_per_expert,
        )
        return loss.total, result


class HybridModel(nn.Module):
    """The whole model: two TorchRec tables, then :class:`HybridOverArch`.

    The forward only calls the tables on fields of the batch, so TorchRec's pipeline can trace it and move their
    input distribution ahead of the step.
    """

    def __init__(self, ebc: EmbeddingBagCollection, ec: EmbeddingCollection, over: HybridOverArch) -> None:
        super().__init__()
        self.ebc = ebc
        self.ec = ec
        self.over = over

    def forward(self, batch: SyntheticBatch) -> tuple[Tensor, StepResult]:
        pooled = self.ebc(batch.sparse)  # KeyedTensor: user_id, item_id -> (B, D)
        sequences = self.ec(batch.history)  # {"history": JaggedTensor of (N, D)}
        result: tuple[Tensor, StepResult] = self.over(pooled, sequences, batch)
        return result


def build_model(
    spec: DataSpec,
    embedding_dim: int = 16,
    encoder_config: ModelConfig | None = None,
    dense_device: torch.device | None = None,
) -> HybridModel:
    """Tables on ``meta`` (DistributedModelParallel allocates each rank's shards), dense modules on ``dense_device``."""
    meta = torch.device("meta")
    # N(0, 0.02) rows learn much faster here than TorchRec's default uniform(±1/sqrt(rows)).
    init = functools.partial(nn.init.normal_, mean=0.0, std=0.02)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="user", embedding_dim=embedding_dim, num_embeddings=spec.num_users,
                               feature_names=["user_id"], init_fn=init),
            EmbeddingBagConfig(name="item", embedding_dim=embedding_dim, num_embeddings=spec.num_items,
                               feature_names=["item_id"], init_fn=init),
        ],
        device=meta,
    )  # fmt: skip
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="history_item", embedding_dim=embedding_dim, num_embeddings=spec.num_items,
                            feature_names=["history"], init_fn=init),
        ],
        device=meta,
    )  # fmt: skip
    encoder_config = encoder_config or ModelConfig(
        encoder=EncoderConfig(d_model=32, num_layers=2, num_heads=4, ffn_hidden=64),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64),
    )
    over = HybridOverArch(TASKS, embedding_dim, spec.num_dense, encoder_config, device=dense_device)
    return HybridModel(ebc, ec, over)


# ---------------------------------------------------------------------------------------------------- sharding


def shard(
    model: HybridModel, device: torch.device, sparse_lr: float = 0.05, lr: float = 3e-3
) -> tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan]:
    """Plan and shard the tables over the default process group; fused sparse + dense optimizers.

    - Row-wise Adagrad is fused into the tables' backward (``apply_optimizer_in_backward``), as TorchRec does at
      scale; Adam trains the dense (data-parallel) parameters.
    - Every table is ``table_wise``: on CPU, gloo offers data_parallel, table_wise, column_wise and
      table_column_wise (row_wise needs CUDA), and data_parallel would hand the tables to Adam.
    """
    tables = list(itertools.chain(model.ebc.parameters(), model.ec.parameters()))
    apply_optimizer_in_backward(RowWiseAdagrad, tables, {"lr": sparse_lr})
    sharders: list[ModuleSharder[nn.Module]] = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]
    pg = dist.group.WORLD
    assert pg is not None, "join a process group first"
    world_size = dist.get_world_size()
    constraints = {t: ParameterConstraints(sharding_types=["table_wise"]) for t in ("user", "item", "history_item")}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda params: torch.optim.Adam(params, lr=lr)
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` measured (on rank 0's view; losses are this rank's share x world size)."""

    world_size: int
    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    per_task: dict[str, list[float]] = field(default_factory=dict)
    tokens_per_expert: list[list[int]] = field(default_factory=list)
    eval_click_auc: float = float("nan")
    eval_like_auc: float = float("nan")
    plan: str = ""


def train_steps(pipeline: TrainPipelineSparseDist, batches: Iterator[SyntheticBatch], steps: int) -> TrainResult:
    """Drive ``steps`` steps of ``pipeline``; returns the loss curve and the last step's routing counts."""
    budget = itertools.islice(batches, steps)  # the pipeline stops on StopIteration
    result = TrainResult(world_size=dist.get_world_size(), steps=0, seconds=0.0)
    result.per_task = {t.name: [] for t in TASKS}
    start = time.perf_counter()
    while True:
        try:
            out: StepResult = pipeline.progress(budget)
        except StopIteration:
            break
        result.steps += 1
        result.loss.append(float(out.loss.total.detach()))
        for name, value in out.loss.per_task.items():
            result.per_task[name].append(float(value))
        result.tokens_per_expert = out.tokens_per_expert.tolist()
    result.seconds = time.perf_counter() - start
    return result


def evaluate_auc(
    pipeline: TrainPipelineSparseDist, model: nn.Module, batches: Iterator[SyntheticBatch], num_batches: int
) -> dict[str, float]:
    """AUC of the binary tasks over this rank's ``num_batches`` held-out batches (``model``: the pipeline's DMP).

    Through the same pipeline in eval mode (no backward, no update): once the pipeline has rewritten the sharded
    modules' forwards, calling the model directly would find no prefetched inputs.
    """
    scores: dict[str, list[np.ndarray]] = {"click": [], "like": []}
    labels: dict[str, list[np.ndarray]] = {"click": [], "like": []}
    model.eval()  # the pipeline skips backward and update for a model in eval mode
    held_out = itertools.islice(batches, num_batches)
    with torch.no_grad():
        while True:
            try:
                out: StepResult = pipeline.progress(held_out)
            except StopIteration:
                break
            for j, task in enumerate(TASKS):
                if task.name in scores:
                    m = out.task_mask[:, j].bool().cpu()
                    scores[task.name].append(out.predictions[task.name].cpu()[m].numpy())
                    labels[task.name].append(out.labels[:, j].cpu()[m].numpy())
    model.train()
    return {k: float(roc_auc_score(np.concatenate(labels[k]), np.concatenate(scores[k]))) for k in scores}


def train(
    steps: int = 20, batch_size: int = 256, seed: int = 0, device: str = "cpu", eval_batches: int = 4
) -> TrainResult:
    """Build, shard and train the hybrid model on this process's rank; evaluate the binary tasks' AUC.

    Joins the process group that torchrun/torchx set up (``RANK``, ``WORLD_SIZE``, ...), or creates a world of one.

    Args:
        steps: training steps (batches per rank).
        batch_size: rows per rank and step.
        seed: seeds the dense initialisation and, with the rank, the data.
        device: ``cpu`` (gloo), ``cuda`` (nccl) or ``auto``.
        eval_batches: held-out batches per rank for the AUCs.
    """
    ctx = init_distributed(device)
    torch.manual_seed(seed)  # the same dense initialisation on every rank
    spec = DataSpec()
    dmp, optimizer, plan = shard(build_model(spec, dense_device=ctx.device), ctx.device)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
    result = train_steps(pipeline, synthetic_batches(spec, batch_size, seed=1000 * seed + ctx.rank), steps)
    held_out = synthetic_batches(spec, batch_size, seed=1000 * seed + ctx.rank + 999_999)
    aucs = evaluate_auc(pipeline, dmp, held_out, eval_batches)
    result.eval_click_auc, result.eval_like_auc = aucs["click"], aucs["like"]
    result.plan = str(plan)
    return result


def summary(result: TrainResult) -> str:
    """A few lines for the console."""
    window = max(1, min(5, result.steps // 2))
    first, last = np.mean(result.loss[:window]), np.mean(result.loss[-window:])
    per_task = ", ".join(f"{k} {np.mean(v[-window:]):.3f}" for k, v in result.per_task.items())
    return "\n".join(
        [
            f"world size {result.world_size}: {result.steps} steps in {result.seconds:.1f} s",
            f"loss {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); per task now: {per_task}",
            f"held-out AUC: click {result.eval_click_auc:.3f}, like {result.eval_like_auc:.3f}",
            f"expert load of the last step (per MoE layer): {result.tokens_per_expert}",
        ]
    )


def plot_losses(result: TrainResult, out_png: Path) -> Path:
    """Training loss per task (each over its own labelled rows) and in total, per step."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)  # the object API, no pyplot: no global backend state
    ax = fig.subplots()
    steps = np.arange(1, result.steps + 1)
    ax.plot(steps, result.loss, color="black", label="total (weighted, + MoE aux losses)")
    for name, values in result.per_task.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"TrainPipelineSparseDist, world size {result.world_size}")
    ax.legend(fontsize="small")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=20, help="training steps per rank")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per rank and step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    args = parser.parse_args(argv)
    quiet()
    try:
        result = train(args.steps, args.batch_size, args.seed, args.device)
        if dist.get_rank() == 0:
            print(summary(result))
            print(plot_losses(result, out_dir("torchrec_pipeline") / "loss.png"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
