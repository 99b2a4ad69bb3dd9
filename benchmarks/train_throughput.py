"""End-to-end training throughput (samples/s of forward + backward + optimizer step) on CPU.

What is timed: one training step per batch, exactly as ``supermoe_rec.training.trainer`` runs it. The TorchRec path is
:func:`supermoe_rec.training.trainer.build_trainer` (model on meta, planner, DistributedModelParallel, fused sparse
optimizer
+ dense Adam) driven by ``TrainPipelineSparseDist.progress``. Batches are assembled *before* timing (the loader's
cost is reported separately as ``assemble_ms``), so the figure is the model step, not the data pipeline.

Cases (each a row of the table):

- ``data``: ``ml100k`` (ml100k-mt train split, real batches from :class:`ShardedBatchLoader`) or ``synthetic``
  (:class:`SyntheticStream`, tables sized by ``--synthetic-users/--synthetic-items``).
- ``arch``: ``supermoe``, ``dense_transformer``, ``mmoe`` (``model.arch``).
- ``impl``: ``torchrec`` (the trainer) or ``plain``: a plain-PyTorch twin of supermoe with the *same* encoder and
  towers modules, ``nn.EmbeddingBag`` / ``nn.Embedding(sparse=True)`` tables trained by ``torch.optim.Adagrad``
  and the dense part by Adam, no TorchRec (with 2 processes: DDP with sparse gradients over gloo).
- ``sparse_optimizer``: the trainer's default ``rowwise_adagrad``, and (supermoe, 1 process) ``adagrad``, the
  twin's optimizer, fused into the TorchRec tables.
- ``lookup``: the sequence lookup, ``bags_of_one`` (EBC, every position a bag of one) or ``embedding_collection``.
- ``grouping``: ``groups`` (``batch_of_groups``: the encoder runs once per (user, position) group, shared by its
  positive and negative) or ``rows`` (``dataset.batch(rows)`` on the same rows: every row its own group).
- ``world``: 1 process (all cores) or 2 processes (``torch.multiprocessing.spawn`` + gloo, 1 thread each, the
  per-rank batch size kept, as training does: samples/s counts the rows of all ranks).

``--generative``: generative training against the per-group path, side by side on real ml100k. Cases: the
``ml100k_mt`` (configs/ml100k.yaml, ml100k-mt) and ``ml100k_universal`` (configs/ml100k_universal.yaml on
RecBole's leave-one-out split) configs, each with ``grouping`` ``groups`` (one encoder pass per (user, position),
batches of ``--batch-size`` rows) and ``generative`` (``model.encoder.generative``: one causal pass per user chunk,
batches of ``--generative-batch-size`` rows), the universal config's ``dense_transformer`` twin on the generative
path, and ``plain_causal``: a plain-PyTorch causal transformer of the universal config's size (``nn.Embedding``
items, ``nn.TransformerEncoder`` with a causal mask, learned positions, the full softmax at every position, Adam;
no TorchRec, no MoE) on the same generative batches. Every case also reports
``targets_per_s``: positive rows per second (one next-item target or one positive sample each), the unit in which
the per-group and generative paths compare.

Timing: every case of a world is built first and warmed up; then ``--repeats`` rounds each time one window of
``--steps`` steps of every case in turn (interleaved, so a burst of load from other users hits all cases alike).
Each case keeps its best window (slowest rank), because on the shared 2-core machines contention only ever adds
time. Ratios are given for the best windows and as the median of same-round ratios (windows run back to back).
The 1-minute load average is recorded next to every figure. ``--profile`` adds torch.profiler runs of the supermoe
variants (self CPU time per op, inclusive time per pipeline stage) and the ops where TorchRec and the twin differ.

    python benchmarks/train_throughput.py --out runs/bench_train.json
    python benchmarks/train_throughput.py --data ml100k --archs supermoe --worlds 1 --out runs/t.json
    python benchmarks/train_throughput.py --profile --data ml100k --worlds 1 --out runs/t.json  # + torch.profiler
    python benchmarks/train_throughput.py --quick --out /tmp/t.json  # smoke: tiny, seconds
    python benchmarks/train_throughput.py --generative --threads 1 --out runs/bench_generative.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.autograd.profiler import record_function

from supermoe_rec.config.experiment import DataConfig, ExperimentConfig, apply_overrides, load_config
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.generative import apply_layout
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.data.synthetic import SyntheticStream, synthetic_schema
from supermoe_rec.models.factory import build_model
from supermoe_rec.models.supermoe import ModelOutput, SuperMoERec
from supermoe_rec.modules.embeddings import EMBEDDING_INIT_STD, SparseOutput
from supermoe_rec.objectives.next_items import CandidateSource, resolve_softmax
from supermoe_rec.objectives.task_indicator import TaskIndicatorLoss

ARCHS = ("supermoe", "dense_transformer", "mmoe")
DATASETS = ("ml100k", "synthetic")
# The --generative cases read the shipped configs: data name -> (config file, overrides).
MT = "ml100k_mt"
UNIVERSAL = "ml100k_universal"
CONFIG_FILES = {MT: ("ml100k.yaml", []), UNIVERSAL: ("ml100k_universal.yaml", ["--data.leave_one_out=true"])}


def load_average() -> float:
    """The 1-minute load average (what else is running on the shared machine)."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 15.0) -> tuple[float, float]:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``timeout_s``).

    Returns: (the load average when measuring starts, seconds waited). Measuring starts anyway after the timeout;
    every figure carries the load average it was measured under.
    """
    start = time.monotonic()
    while load_average() >= max_load and time.monotonic() - start < timeout_s:
        time.sleep(poll_s)
    return load_average(), time.monotonic() - start


# ------------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    """One measured configuration (one row of the table)."""

    data: str
    arch: str = "supermoe"
    impl: str = "torchrec"  # torchrec | plain
    lookup: str = "bags_of_one"  # bags_of_one | embedding_collection (torchrec); nn.Embedding (plain)
    grouping: str = "groups"  # groups | rows
    world: int = 1
    sparse_optimizer: str = "rowwise_adagrad"  # the trainer's default; plain: adagrad

    @property
    def label(self) -> str:
        opt = "" if self.sparse_optimizer == "rowwise_adagrad" else f"/{self.sparse_optimizer}"
        return f"{self.data}/{self.arch}/{self.impl}/{self.lookup}/{self.grouping}/w{self.world}{opt}"


def plain_case(data: str, world: int) -> Case:
    """The plain-PyTorch twin of supermoe (its own lookup and optimizer)."""
    return Case(data, "supermoe", impl="plain", lookup="nn.Embedding", world=world, sparse_optimizer="adagrad")


@dataclass(frozen=True)
class Options:
    """Measurement settings shared by every case (see the CLI flags)."""

    batch_size: int
    warmup: int
    generative_batch_size: int
    steps: int
    repeats: int
    threads: int
    synthetic_users: int
    synthetic_items: int
    profile_steps: int
    quick: bool


def make_cases(
    datasets: list[str], archs: list[str], worlds: list[int], plain: bool, lookups: bool, grouping: bool
) -> list[Case]:
    """Every requested case: archs x data x world, plus the side-by-side variants of supermoe."""
    cases: list[Case] = []
    for world in worlds:
        for data in datasets:
            for arch in archs:
                cases.append(Case(data, arch, world=world))
            if "supermoe" not in archs:
                continue
            if plain:
                cases.append(plain_case(data, world))
                if world == 1:  # the same optimizer as the twin: full (per-element) Adagrad, fused
                    cases.append(Case(data, "supermoe", world=world, sparse_optimizer="adagrad"))
            if lookups and world == 1:
                cases.append(Case(data, "supermoe", lookup="embedding_collection", world=world))
            if grouping and data == "ml100k":
                cases.append(Case(data, "supermoe", grouping="rows", world=world))
    return cases


def generative_cases() -> list[Case]:
    """``--generative``: each config per group and generative, and the plain causal twin (1 process)."""
    return [
        Case(MT),
        Case(MT, grouping="generative"),
        Case(UNIVERSAL),
        Case(UNIVERSAL, grouping="generative"),
        Case(UNIVERSAL, "dense_transformer", grouping="generative"),  # the twin's structure, through TorchRec
        Case(UNIVERSAL, impl="plain_causal", lookup="nn.Embedding", grouping="generative", sparse_optimizer="adam"),
    ]


def experiment_config(case: Case, opts: Options) -> ExperimentConfig:
    """The configs/ml100k.yaml model on the case's data, arch and sequence lookup."""
    generative = case.grouping == "generative"
    overrides = [
        f"--model.arch={case.arch}",
        f"--model.sequence_lookup={case.lookup if case.impl == 'torchrec' else 'auto'}",
        f"--train.batch_size={opts.generative_batch_size if generative else opts.batch_size}",
        f"--model.encoder.generative={str(generative).lower()}",
        f"--train.sparse_optimizer={case.sparse_optimizer if case.impl == 'torchrec' else 'rowwise_adagrad'}",
        "--train.tensorboard=false",
        "--train.device=cpu",
        "--data.try_url=false",
    ]
    if case.data == "synthetic":
        overrides += [
            "--data.source=synthetic",
            f"--data.synthetic_users={opts.synthetic_users}",
            f"--data.synthetic_items={opts.synthetic_items}",
        ]
    if case.data in CONFIG_FILES:
        name, extra = CONFIG_FILES[case.data]
        return load_config(Path(__file__).resolve().parents[1] / "configs" / name, [*extra, *overrides])
    return apply_overrides(ExperimentConfig(), overrides)


# ---------------------------------------------------------------------------------------------------- data


def synthetic_split_data(cfg: DataConfig, rows: int = 64) -> SplitData:
    """A small ``train`` TabularDataset in the synthetic schema: what :func:`build_trainer` needs to build the model.

    The trainer reads the schema, label means and one example batch from it; the timed batches come from
    :class:`SyntheticStream` itself.
    """
    schema = synthetic_schema(cfg)
    batch = SyntheticStream(cfg, rows).make_batch(0)
    n = batch.batch_size
    seq = batch.sequence_features.to_dict()
    hist_len = seq["history"].lengths().numpy()
    hist = np.split(seq["history"].values().numpy(), np.cumsum(hist_len)[:-1])
    group = batch.group_index.numpy()
    leader_of_group = {int(g): i for i, g in reversed(list(enumerate(group)))}
    labels = batch.labels.numpy().copy()
    labels[batch.task_mask.numpy() == 0] = np.nan  # unlabelled: NaN (no mask column in the synthetic schema)
    frame = pd.DataFrame(
        {
            "user": batch.user_index.numpy(),
            "segment": batch.sparse_features.to_dict()["segment"].values().numpy(),
            "history": [list(hist[leader_of_group[int(g)]]) for g in group],
            "item": seq["target_item"].values().numpy(),
            "group": group,
            **{f"y{t}": labels[:, t] for t in range(labels.shape[1])},
        }
    )
    assert len(frame) == n
    return SplitData(schema=schema, splits={"train": TabularDataset(frame, schema, "synthetic")}, info={})


def make_batches(
    case: Case, cfg: ExperimentConfig, data: SplitData | None, rank: int, world: int, count: int
) -> tuple[list[Batch], float]:
    """``count`` of this rank's batches, built ahead of timing, and the mean ms it took to assemble one."""
    start = time.perf_counter()
    batches: list[Batch] = []
    if case.data == "synthetic":
        stream = SyntheticStream(cfg.data, cfg.train.batch_size, rank, world)
        batches = [stream.make_batch(b * world + rank) for b in range(count)]
    else:
        assert data is not None
        loader = ShardedBatchLoader(data.splits["train"], cfg.train.batch_size, rank, world, shuffle=True, seed=0)
        plan = loader._plan()  # the loader's own group shards, so both groupings see the same rows
        dataset = loader.dataset
        table = data.schema.next_items_table()
        source = None
        if table is not None:  # the next-items objective's candidates, as the trainer's loader draws them
            n = table.num_embeddings
            source = CandidateSource(resolve_softmax(cfg.train.next_items, n), n, cfg.train.next_items.num_sampled)
        for k, groups in enumerate(plan[:count]):
            candidates = source(k) if source is not None else None
            if case.grouping == "rows":
                batches.append(dataset.batch(dataset.rows_of_groups(groups), candidates))
            else:
                batches.append(dataset.batch_of_groups(groups, candidates))
        if len(batches) < count:
            raise ValueError(f"ml100k: only {len(batches)} batches per rank, {count} needed")
    return batches, (time.perf_counter() - start) / max(1, count) * 1e3


# ------------------------------------------------------------------------------------------ plain PyTorch twin


class PlainSparseArch(nn.Module):
    """The SparseArch's tables in plain PyTorch: ``nn.EmbeddingBag`` for pooled features, ``nn.Embedding`` for
    sequence features (jagged values [N_f, D]), both with sparse gradients. Same tables, widths, pooling and
    N(0, 0.02) init; returns the same :class:`SparseOutput`."""

    def __init__(self, schema: Schema, embedding_dim: int) -> None:
        super().__init__()

        def dim(table: str) -> int:
            return schema.table(table).embedding_dim or embedding_dim

        self.pooled_table: dict[str, str] = {f.name: f.table for f in schema.sparse_features}
        self.sequence_table: dict[str, str] = {f.name: f.table for f in schema.sequence_features}
        multi = {f.table for f in schema.sparse_features if f.multi_valued}
        self.bags = nn.ModuleDict(
            {
                t: nn.EmbeddingBag(
                    schema.table(t).num_embeddings, dim(t), mode="mean" if t in multi else "sum", sparse=True
                )
                for t in dict.fromkeys(self.pooled_table.values())
            }
        )
        self.embeddings = nn.ModuleDict(
            {
                t: nn.Embedding(schema.table(t).num_embeddings, dim(t), sparse=True)
                for t in dict.fromkeys(self.sequence_table.values())
            }
        )
        for p in self.parameters():
            nn.init.normal_(p, 0.0, EMBEDDING_INIT_STD)

    def forward(self, batch: Batch) -> SparseOutput:
        pooled = {}
        for name, jt in batch.sparse_features.to_dict().items():
            bag = self.bags[self.pooled_table[name]]
            pooled[name] = bag(jt.values(), jt.offsets()[:-1].long())  # (B, D)
        values, lengths = {}, {}
        for name, jt in batch.sequence_features.to_dict().items():
            table = self.embeddings[self.sequence_table[name]]
            values[name] = table(jt.values())  # (N_f, D) in (row, position) order, as the ids are
            lengths[name] = jt.lengths().long()
        return SparseOutput(pooled=pooled, values=values, lengths=lengths)


class PlainSuperMoE(nn.Module):
    """Plain tables + the very encoder/towers modules the TorchRec model uses + the task-indicator loss."""

    def __init__(self, cfg: ExperimentConfig, schema: Schema) -> None:
        super().__init__()
        built = build_model(cfg.model, schema, device=torch.device("cpu"), sparse_device=torch.device("meta"))
        assert isinstance(built, SuperMoERec)
        self.sparse = PlainSparseArch(schema, cfg.model.embedding_dim)
        self.over_arch = built.over_arch
        self.loss_fn = TaskIndicatorLoss(
            schema.task_specs(),
            balance_loss_weight=cfg.train.loss.balance_loss_weight,
            z_loss_weight=cfg.train.loss.z_loss_weight,
            global_normalization=dist.is_initialized() and dist.get_world_size() > 1,
        )

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        out: ModelOutput = self.over_arch(self.sparse(batch), batch)
        loss = self.loss_fn(out.predictions, batch.labels, batch.task_mask, out.balance_loss, out.z_loss)
        return loss.total, out


class PlainTrainer:
    """forward, backward, Adagrad (sparse rows) + Adam (dense) steps: a plain PyTorch training step."""

    def __init__(self, cfg: ExperimentConfig, schema: Schema, world: int) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model: nn.Module = PlainSuperMoE(cfg, schema)
        inner = self.model
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(inner)
        sparse = [p for n, p in inner.named_parameters() if n.startswith("sparse.")]
        dense = [p for n, p in inner.named_parameters() if not n.startswith("sparse.")]
        self.sparse_opt = torch.optim.Adagrad(sparse, lr=cfg.train.sparse_lr, eps=1e-8)
        self.dense_opt = torch.optim.Adam(dense, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def progress(self, it: Iterator[Batch]) -> int:
        batch = next(it)
        with record_function("## zero_grad ##"):  # the pipeline's stage names, for side-by-side profiles
            self.sparse_opt.zero_grad(set_to_none=True)
            self.dense_opt.zero_grad(set_to_none=True)
        with record_function("## forward ##"):
            loss, _ = self.model(batch)
        with record_function("## backward ##"):
            loss.backward()
        with record_function("## optimizer ##"):
            self.sparse_opt.step()
            self.dense_opt.step()
        return batch.batch_size


class PlainCausal(nn.Module):
    """A plain-PyTorch causal transformer of the universal config's size, trained as SASRec with cross-entropy.

    ``nn.Embedding`` items (width M), learned absolute positions, ``nn.TransformerEncoder`` (pre-LN, GELU, a causal
    mask, M model width, the config's layers, heads and FFN width, no dropout), the full softmax over the item table
    at every owned position of the generative batch: token k predicts the chunk's item k. No TorchRec, no MoE.
    """

    def __init__(self, cfg: ExperimentConfig, schema: Schema) -> None:
        super().__init__()
        enc = cfg.model.encoder
        table = schema.next_items_table()
        assert table is not None, "the plain causal twin needs the next-items objective"
        self.items = nn.Embedding(table.num_embeddings, enc.d_model)
        self.start = nn.Parameter(torch.zeros(enc.d_model))
        self.positions = nn.Embedding(cfg.data.chunk_length + 1, enc.d_model)
        layer = nn.TransformerEncoderLayer(
            enc.d_model, enc.num_heads, enc.ffn_hidden, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, enc.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(enc.d_model)
        for w in (self.items.weight, self.positions.weight):
            nn.init.normal_(w, 0.0, EMBEDDING_INIT_STD)

    def forward(self, batch: Batch) -> torch.Tensor:
        assert batch.target_start is not None
        history = batch.sequence_features["history"]
        lengths = history.lengths().long()
        rows = lengths.nonzero().squeeze(1)  # the chunks' leader rows
        ids = history.to_padded_dense(padding_value=0)[rows].long()  # (G, L)
        G, L = ids.shape
        x = torch.cat([self.start.expand(G, 1, -1), self.items(ids)], dim=1)  # (G, 1 + L, M)
        x = x + self.positions.weight[: L + 1]
        causal = nn.Transformer.generate_square_subsequent_mask(L + 1)
        h = self.norm(self.encoder(x, mask=causal, is_causal=True))  # (G, 1 + L, M)
        k = torch.arange(L + 1)[None, :]
        owned = (k >= batch.target_start[:, None]) & (k < lengths[rows][:, None])  # tokens with a next item
        g_idx, k_idx = owned.nonzero(as_tuple=True)
        logits = h[g_idx, k_idx] @ self.items.weight.T  # (P, N)
        return nn.functional.cross_entropy(logits, ids[g_idx, k_idx])


class PlainCausalTrainer:
    """forward, backward, Adam: the plain causal twin's training step."""

    def __init__(self, cfg: ExperimentConfig, schema: Schema) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = PlainCausal(cfg, schema)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)

    def progress(self, it: Iterator[Batch]) -> int:
        batch = next(it)
        self.opt.zero_grad(set_to_none=True)
        self.model(batch).backward()
        self.opt.step()
        return batch.batch_size


# -------------------------------------------------------------------------------------------------- running


def _window(step: Callable[[], int], steps: int, world: int) -> tuple[float, int]:
    """Seconds (slowest rank) and rows (all ranks) of ``steps`` consecutive steps."""
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    rows = sum(step() for _ in range(steps))
    seconds = time.perf_counter() - start
    if world > 1:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = torch.tensor([rows], dtype=torch.int64)
        dist.all_reduce(n)
        seconds, rows = float(t), int(n)
    return seconds, rows


def _profile(step: Callable[[], int], steps: int) -> dict[str, Any]:
    """Self-CPU time per op over ``steps`` steps (torch.profiler): total ms per step and every op's share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    # The pipeline names its stage ranges per batch ("## forward 12 ##"): aggregate them by stage.
    stages: dict[str, float] = {}
    ops: dict[str, list[float]] = {}
    for e in events:
        name = re.sub(r" \d+ ##$", " ##", e.key)
        if name.startswith("## "):
            stages[name] = stages.get(name, 0.0) + e.cpu_time_total / steps / 1e3  # inclusive
        if e.self_cpu_time_total > 0:  # a stage's own self time is the Python work between its ops
            acc = ops.setdefault(name, [0.0, 0.0])
            acc[0] += e.self_cpu_time_total / steps / 1e3
            acc[1] += e.count / steps
    return {
        "self_ms_per_step": total / steps / 1e3,
        "stages_ms_per_step": dict(sorted(stages.items(), key=lambda kv: -kv[1])),
        "ops": [
            {"op": op, "self_ms_per_step": ms, "share": ms * steps * 1e3 / max(total, 1), "calls_per_step": calls}
            for op, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])
        ],
    }


def profile_diff(a: dict[str, Any], b: dict[str, Any], top: int = 12) -> list[dict[str, Any]]:
    """Ops whose self time per step differs most between two profiles (a - b), largest first."""
    ms_a = {o["op"]: o["self_ms_per_step"] for o in a["ops"]}
    ms_b = {o["op"]: o["self_ms_per_step"] for o in b["ops"]}
    diffs = [{"op": op, "a_ms": ms_a.get(op, 0.0), "b_ms": ms_b.get(op, 0.0)} for op in set(ms_a) | set(ms_b)]
    for d in diffs:
        d["diff_ms"] = d["a_ms"] - d["b_ms"]
    return sorted(diffs, key=lambda d: abs(d["diff_ms"]), reverse=True)[:top]


@dataclass
class Prepared:
    """A built case: its step function (one training step on the next pre-built batch) and what it measured."""

    case: Case
    step: Callable[[], int]
    result: dict[str, Any]
    profile_steps: int
    windows: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    # Runs the batches a pipeline has read ahead, so that no collective is still in flight at teardown.
    drain: Callable[[], None] = lambda: None


def prepare_case(case: Case, opts: Options, rank: int, world: int, cache: dict[str, Any]) -> Prepared:
    """Build the case's trainer (or plain twin) and pre-build all the batches it will step through."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from supermoe_rec.distributed.process_group import DistContext
    from supermoe_rec.training.trainer import build_trainer

    cfg = experiment_config(case, opts)
    if case.data not in cache:
        cache[case.data] = synthetic_split_data(cfg.data) if case.data == "synthetic" else load_data(cfg.data)
    data: SplitData = apply_layout(cache[case.data], cfg)  # generative cases: chunks of users' sequences
    # Profile only the supermoe step variants (TorchRec vs plain, EC vs bags of one), to keep the output readable.
    profile_steps = opts.profile_steps if case.arch == "supermoe" and case.grouping == "groups" else 0
    count = opts.warmup + opts.steps * opts.repeats + profile_steps + 2  # +2: the pipeline reads ahead
    batches, assemble_ms = make_batches(case, cfg, data, rank, world, count)
    it = iter(batches)
    start = time.perf_counter()
    step: Callable[[], int]
    if case.impl == "plain":
        plain = PlainTrainer(cfg, data.schema, world)

        def step() -> int:
            return plain.progress(it)

    elif case.impl == "plain_causal":
        causal = PlainCausalTrainer(cfg, data.schema)

        def step() -> int:
            return causal.progress(it)

    else:
        ctx = DistContext(rank, world, rank, torch.device("cpu"))
        trainer = build_trainer(cfg, ctx, data)
        pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, ctx.device)

        def step() -> int:
            return int(pipeline.progress(it).labels.shape[0])

        def drain() -> None:
            # The pipeline has started the input dist of the batches it read ahead (gloo async work). Destroying
            # the process group under that in-flight work can abort the process at exit, so finish those batches.
            with contextlib.suppress(StopIteration):
                while True:
                    pipeline.progress(it)

        sharding = {
            f"{path.rsplit('.', 1)[-1]}.{table}": ps.sharding_type
            for path, module_plan in trainer.plan.plan.items()
            for table, ps in module_plan.items()  # type: ignore[attr-defined]
        }

    result: dict[str, Any] = {**dataclasses.asdict(case), "label": case.label, "build_s": time.perf_counter() - start}
    if case.impl == "torchrec":
        result["sharding"] = sharding
    result["assemble_ms"] = assemble_ms
    result["groups_per_step"] = float(np.mean([b.num_groups for b in batches]))
    # Positive rows: one next-item target, or one positive sample with its negative, each.
    positives = sum(float(((b.labels[:, 0] == 1) & (b.task_mask[:, 0] == 1)).sum()) for b in batches)
    result["positive_fraction"] = positives / max(1, sum(b.batch_size for b in batches))
    for _ in range(opts.warmup):
        step()
    prepared = Prepared(case, step, result, profile_steps)
    if case.impl == "torchrec":
        prepared.drain = drain
    return prepared


def measure(prepared: list[Prepared], opts: Options, world: int) -> None:
    """Time ``repeats`` rounds; each round runs one window of every case in turn, so a burst of load from other
    users hits all cases alike, and each case keeps its best window."""
    for _ in range(opts.repeats):
        for p in prepared:
            p.windows.append(_window(p.step, opts.steps, world))
    for p in prepared:
        seconds, rows = min(p.windows, key=lambda w: w[0] / w[1])
        p.result.update(
            samples_per_s=rows / seconds,
            targets_per_s=rows / seconds * p.result["positive_fraction"],
            ms_per_step=seconds / opts.steps * 1e3,
            rows_per_step=rows / opts.steps,
            window_samples_per_s=[n / s for s, n in p.windows],
            load_avg_1m=load_average(),
        )
        if p.profile_steps:
            p.result["profile"] = _profile(p.step, p.profile_steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str, cases: list[Case], opts: Options) -> None:
    """One rank: run every case in order (all ranks run the same cases, so collectives stay in step)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, opts.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cache: dict[str, Any] = {}
    prepared: list[Prepared] = []
    results: list[dict[str, Any]] = []
    try:
        for case in cases:
            try:
                prepared.append(prepare_case(case, opts, rank, world, cache))
            except Exception as exc:  # one failing case must not hide the others' figures
                if world > 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
                results.append({**dataclasses.asdict(case), "label": case.label, "error": error})
        measure(prepared, opts, world)
        for p in prepared:
            p.drain()
        if world > 1:
            dist.barrier()  # every rank is done with every collective before the group goes
        results = [p.result for p in prepared] + results
        if rank == 0:
            for r in results:
                print(_row_text(r), flush=True)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (Path(out_dir) / "results.json").write_text(json.dumps(results))


def run_world(cases: list[Case], world: int, opts: Options) -> list[dict[str, Any]]:
    """Run ``cases`` in ``world`` fresh spawned processes (gloo); rank 0's results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), out_dir, cases, opts), nprocs=world, join=True)
        results: list[dict[str, Any]] = json.loads((Path(out_dir) / "results.json").read_text())
        return results


def _row_text(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['label']:70s} ERROR {r['error']}"
    return (
        f"{r['label']:62s} {r['samples_per_s']:9.0f} samples/s {r['targets_per_s']:9.0f} targets/s "
        f"{r['ms_per_step']:8.1f} ms/step "
        f"(G/step {r['groups_per_step']:.0f}, load {r['load_avg_1m']:.2f})"
    )


def add_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """samples/s ratios of matching cases: TorchRec / plain twin, EC / bags of one, groups / rows, 2 / 1 processes."""
    by_label = {r["label"]: r for r in results if "samples_per_s" in r}
    ratios: list[dict[str, Any]] = []

    def ratio(name: str, num: Case, den: Case) -> None:
        a, b = by_label.get(num.label), by_label.get(den.label)
        if a is not None and b is not None:
            # Same-round ratios: the two windows ran back to back, under the same outside load.
            rounds = [x / y for x, y in zip(a["window_samples_per_s"], b["window_samples_per_s"], strict=False)]
            ratios.append(
                {
                    "ratio": name,
                    "num": a["label"],
                    "den": b["label"],
                    "value": a["samples_per_s"] / b["samples_per_s"],
                    "round_median": float(np.median(rounds)) if rounds else float("nan"),
                    "rounds": rounds,
                }
            )

    datasets = dict.fromkeys(r["data"] for r in results)
    archs = dict.fromkeys(r["arch"] for r in results)
    for d in datasets:  # generative against per-group: the same rows, so samples/s and targets/s ratios agree
        ratio("generative/per-group", Case(d, grouping="generative"), Case(d))
    twin = generative_cases()[-1]
    ratio("generative/plain causal", Case(UNIVERSAL, grouping="generative"), twin)
    ratio("generative/plain causal", Case(UNIVERSAL, "dense_transformer", grouping="generative"), twin)
    for world in (1, 2):
        for d in datasets:
            base = Case(d, world=world)
            ratio("torchrec/plain", base, plain_case(d, world))
            ratio("torchrec/plain", Case(d, world=world, sparse_optimizer="adagrad"), plain_case(d, world))
            ratio("torchrec/plain", Case(d, lookup="embedding_collection", world=world), plain_case(d, world))
            ratio("ec/bags_of_one", Case(d, lookup="embedding_collection", world=world), base)
            ratio("groups/rows", base, Case(d, grouping="rows", world=world))
            if world == 2:
                for arch in archs:
                    ratio("2 procs/1 proc", Case(d, arch, world=2), Case(d, arch, world=1))
                ratio("2 procs/1 proc", plain_case(d, 2), plain_case(d, 1))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--worlds", nargs="+", type=int, choices=(1, 2), default=[1, 2])
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch twin")
    parser.add_argument("--no-lookups", action="store_true", help="skip the EmbeddingCollection lookup cases")
    parser.add_argument("--no-grouping", action="store_true", help="skip the one-group-per-row case")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per step per rank")
    parser.add_argument("--generative", action="store_true", help="only the generative vs per-group cases (ml100k)")
    parser.add_argument("--generative-batch-size", type=int, default=2048, help="rows per step of generative cases")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one window per case); the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (split per rank)")
    parser.add_argument("--synthetic-users", type=int, default=100_000)
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of every world-1 case")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--wait-s", type=float, default=600, help="longest wait for --max-load (0: no wait)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny synthetic tables, 1 window of 1 step")
    args = parser.parse_args()

    if args.quick:
        args.batch_size, args.warmup, args.steps, args.repeats = 64, 1, 1, 1
        args.synthetic_users, args.synthetic_items, args.wait_s = 1000, 1000, 0
    opts = Options(
        batch_size=args.batch_size,
        generative_batch_size=args.generative_batch_size,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        threads=args.threads,
        synthetic_users=args.synthetic_users,
        synthetic_items=args.synthetic_items,
        profile_steps=args.profile_steps if args.profile else 0,
        quick=args.quick,
    )
    cases = make_cases(args.data, args.archs, args.worlds, not args.no_plain, not args.no_lookups, not args.no_grouping)
    if args.generative:
        cases, args.worlds = generative_cases(), [1]
    load, waited = wait_for_quiet(args.max_load, args.wait_s)
    print(f"{len(cases)} cases, {os.cpu_count()} CPUs, load average {load:.2f} (waited {waited:.0f} s)", flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for world in sorted(set(args.worlds)):
        mine = [c for c in cases if c.world == world]
        if mine:
            world_opts = dataclasses.replace(opts, profile_steps=opts.profile_steps * (world == 1))
            results += run_world(mine, world, world_opts)
    ratios = add_ratios(results)
    print("\nratios of best windows (samples/s):")
    for r in ratios:
        same = f"(same-round median {r['round_median']:.2f}x)"
        print(f"  {r['ratio']:15s} {r['value']:6.2f}x {same}  {r['num']}  vs  {r['den']}")
    profiles = {r["label"]: r["profile"] for r in results if "profile" in r}
    for label, prof in profiles.items():
        print(f"\nprofile {label}: {prof['self_ms_per_step']:.1f} ms self CPU per step; stages (inclusive ms):")
        print("  " + ", ".join(f"{k.strip('# ')} {v:.1f}" for k, v in prof["stages_ms_per_step"].items()))
        print("  top ops (self):")
        for o in prof["ops"][:12]:
            print(f"  {o['op'][:64]:64s} {o['self_ms_per_step']:8.2f} ms {100 * o['share']:5.1f}%")
    diffs = {}
    for d in args.data:
        a, b = Case(d).label, plain_case(d, 1).label
        if a in profiles and b in profiles:
            diffs[f"{a} - {b}"] = diff = profile_diff(profiles[a], profiles[b])
            total = profiles[a]["self_ms_per_step"] - profiles[b]["self_ms_per_step"]
            print(f"\nwhere TorchRec differs from the plain twin ({d}, {total:+.1f} ms self CPU per step):")
            for x in diff:
                print(f"  {x['op'][:64]:64s} {x['diff_ms']:+7.2f} ms  ({x['a_ms']:.2f} vs {x['b_ms']:.2f})")
    payload = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "settings": dataclasses.asdict(opts),
        "argv": sys.argv[1:],
        "results": results,
        "ratios": ratios,
        "profile_diffs": diffs,
        "wall_s": time.perf_counter() - started,
        "load_avg_start": load,
        "waited_s": waited,
        "load_avg_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
