"""Plan a config's sharding on a simulated GPU cluster: where the parameters live and what each rank holds.

    supermoe-rec plan --config configs/scale_1t.yaml --world-size 1024 --hbm-gb 80 [--local-world-size 8]
                      [--ddr-gb 128] [--json out.json] [--section.key=value ...]

Nothing is allocated and no GPU or process group is needed: the model (tables and dense modules) is built on
``torch.device("meta")`` from the config's schema (``data.source: synthetic`` sizes the tables with
``data.synthetic_users`` / ``synthetic_items``; ``table`` reads the schema YAML), and TorchRec's own
:class:`EmbeddingShardingPlanner` plans it with ``plan()`` against ``Topology(world_size=W, compute_device="cuda",
hbm_cap=...)``. The planning matches the trainer's: both build through :mod:`supermoe_rec.distributed.sharding`:

- the same sharders, the same module (:func:`~supermoe_rec.distributed.sharding.build_train_module`, so plan keys
  read ``model.sparse_arch...``) and the same constraints (``train.sharding``; no ``data_parallel`` unless asked);
- the sparse optimizer is fused into the (meta) table weights exactly as the trainer does, which is how the
  planner's storage estimator learns it (``tensor._optimizer_classes``): row-wise Adagrad adds one float per row,
  Adagrad one per weight, Adam two;
- ``sequence_lookup: auto`` resolves for the simulated device (CUDA: the unpooled EmbeddingCollection).

Where it differs, on purpose:

- The planner's default storage reservation guesses dense memory as 6x every non-table parameter. Built without a
  process group, the model holds all E experts of every MoE layer, while under ``train.expert_parallel`` a rank
  holds E/W; so the reservation is given our per-rank estimate instead (``dense_tensor_estimate``): replicated
  dense weights + Adam (2 states) + gradient + DDP bucket, and local expert weights + Adam + gradient.
- The synthetic generator's pooling factors are passed as constraints (a row carries ``max_history / (2 * C)``
  history ids on average: lengths are uniform in [0, max_history] on one row of each group of C candidates), so
  the perf estimate prices the history lookups rather than the planner's default of one id per feature.
- Proposers: the planner's greedy and uniform proposers always run; its exhaustive grid search runs only while
  ``proposals x W`` stays under :data:`GRID_SEARCH_BUDGET`, since each proposal is partitioned over all W devices
  (measured on 2 CPU cores: the 1T config's full grid of 2560 proposals took ~180 s at W=1024, the greedy
  proposers 4-12 s; on a 100B-scale model at W=128 the grid's plan was rated 0.5% faster than greedy's).

The report (:meth:`PlanReport.as_dict`, written by ``--json``) has the keys :data:`REPORT_KEYS`:

- ``config``, ``cluster`` (world_size, local_world_size, hbm_gb / ddr_gb per rank, compute_device),
  ``batch_size_per_rank``, ``sparse_optimizer``, ``sequence_lookup``;
- ``params``: total, embedding, dense (everything not in a table, experts included), experts, dense_replicated,
  moe_layers, experts_per_layer, experts_per_rank_per_layer, per_table;
- ``tables``: per table its rows, dim, params, sharding_type, compute_kernel, ranks (``"0-1023"``), num_ranks,
  num_shards, storage_bytes (hbm, ddr) and perf_ms, the sum of its shards' estimated fwd+bwd compute and comms;
- ``memory_per_rank_bytes``: embeddings (planner storage of the shards on a rank: weights, optimizer state and
  lookup buffers; max/mean/min over ranks, HBM and DDR), embedding_weights and embedding_optimizer (max/mean),
  experts and dense (weights + Adam states), gradients, total_max (HBM), hbm_capacity, hbm_usable (after the
  planner's reservation);
- ``embedding_bytes_total``: weights, optimizer and storage summed over ranks;
- ``perf_ms``: the planner's per-rank estimate (fwd/bwd compute and comms of the embedding shards) at the slowest
  rank, with its breakdown and the mean over ranks;
- ``planner``: proposers, proposals, plans, seconds; ``where_parameters_live`` (a sentence); ``elapsed_s``.

Example::

    >>> from supermoe_rec.config.experiment import apply_overrides, ExperimentConfig
    >>> cfg = apply_overrides(ExperimentConfig(), ["--data.source=synthetic", "--data.synthetic_items=10000"])
    >>> report = plan_config(cfg, ClusterSpec(world_size=2, hbm_gb=1.0, local_world_size=2))
    >>> sorted(t["name"] for t in report.tables), report.params["embedding"] == 32 * (100_000 + 64 + 10_000)
    (['item', 'segment', 'user'], True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import DDR_CAP
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, Stats

from supermoe_rec.config.experiment import Arch, ConfigError, ExperimentConfig, SparseOptimizer, load_config
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.synthetic import CANDIDATES_PER_GROUP, synthetic_schema
from supermoe_rec.distributed.sharding import build_train_module, sharders, sharding_constraints
from supermoe_rec.models.factory import count_parameters
from supermoe_rec.models.train_module import TrainModule
from supermoe_rec.modules.embeddings import SparseArch, resolve_sequence_lookup
from supermoe_rec.modules.experts import BatchedExperts

log = logging.getLogger(__name__)

GIB = 1024**3
FP32_BYTES = 4
# Adam keeps two fp32 states (exp_avg, exp_avg_sq) per dense and expert parameter (the trainer's dense optimizer).
ADAM_STATES = 2
# TorchRec's default: 15% of HBM kept free as a margin for what the estimates miss (activations, fragmentation).
RESERVED_HBM_FRACTION = 0.15
# Grid search partitions every proposal over all W devices (a deepcopy of the topology each time), so its cost is
# ~proposals x W; past this product it is skipped and the greedy proposers decide alone.
GRID_SEARCH_BUDGET = 400_000
# The simulated accelerator: the planner prices HBM, CUDA kernels and NCCL-style comms.
COMPUTE_DEVICE = "cuda"

REPORT_KEYS = (
    "config",
    "cluster",
    "batch_size_per_rank",
    "sparse_optimizer",
    "sequence_lookup",
    "params",
    "tables",
    "memory_per_rank_bytes",
    "embedding_bytes_total",
    "perf_ms",
    "planner",
    "where_parameters_live",
    "elapsed_s",
)


class PlanError(ConfigError):
    """The config cannot be planned on the cluster (it does not fit, or W does not divide E); says what to change."""


@dataclass(frozen=True)
class ClusterSpec:
    """A simulated GPU cluster.

    Args:
        world_size: W, ranks (GPUs).
        hbm_gb: HBM per rank, GiB.
        local_world_size: ranks per host (prices intra- vs inter-host comms); clamped to W.
        ddr_gb: host memory per rank that UVM kernels may use, GiB (TorchRec's default: 128).
    """

    world_size: int
    hbm_gb: float
    local_world_size: int = 8
    ddr_gb: float = DDR_CAP / GIB

    def validated(self) -> ClusterSpec:
        """A copy with ``local_world_size`` clamped to W; raises :class:`PlanError` on impossible values."""
        if self.world_size < 1:
            raise PlanError(f"--world-size must be >= 1, got {self.world_size}")
        if self.hbm_gb <= 0 or self.ddr_gb < 0:
            raise PlanError(f"--hbm-gb must be > 0 and --ddr-gb >= 0, got {self.hbm_gb} and {self.ddr_gb}")
        local = min(self.local_world_size, self.world_size)
        if local < 1 or self.world_size % local:
            raise PlanError(
                f"--local-world-size {self.local_world_size} must divide --world-size {self.world_size} "
                "(every host holds the same number of ranks)"
            )
        return dataclasses.replace(self, local_world_size=local)


@dataclass
class PlanReport:
    """What :func:`plan_config` found; :meth:`as_dict` is the ``--json`` document (keys :data:`REPORT_KEYS`)."""

    config: str
    cluster: dict[str, Any]
    batch_size_per_rank: int
    sparse_optimizer: str
    sequence_lookup: str
    params: dict[str, Any]
    tables: list[dict[str, Any]]
    memory_per_rank_bytes: dict[str, Any]
    embedding_bytes_total: dict[str, int]
    perf_ms: dict[str, Any]
    planner: dict[str, Any]
    where_parameters_live: str
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in REPORT_KEYS}


# --------------------------------------------------------------------------------------------------- the model


def plan_schema(cfg: ExperimentConfig) -> Schema:
    """The schema whose tables are planned: synthetic (sized by ``data.synthetic_*``) or the ``data.schema`` YAML."""
    if cfg.data.source == "synthetic":
        schema = synthetic_schema(cfg.data)
    elif cfg.data.source == "table":
        if cfg.data.schema is None:
            raise ConfigError("data.schema: source 'table' needs a schema YAML (its tables give the row counts)")
        schema = Schema.from_yaml(cfg.data.schema)
    else:
        raise ConfigError(
            f"data.source: plan sizes tables from the schema, so it needs 'synthetic' or 'table', got "
            f"{cfg.data.source!r} (set --data.source=synthetic --data.synthetic_users=... --data.synthetic_items=...)"
        )
    return schema.select_tasks(cfg.data.tasks) if cfg.data.tasks else schema


def build_meta_module(cfg: ExperimentConfig, schema: Schema) -> TrainModule:
    """The trainer's module (model + loss), every parameter on meta, sparse optimizer fused as in training."""
    meta = torch.device("meta")
    return build_train_module(cfg, schema, device=meta, sparse_device=meta)


def optimizer_state_per_weight(kind: SparseOptimizer, dim: int) -> float:
    """fp32 optimizer values per table weight, as TorchRec's storage estimator counts them."""
    return {
        SparseOptimizer.ROWWISE_ADAGRAD: 1.0 / dim,  # one accumulator per row
        SparseOptimizer.ADAGRAD: 1.0,
        SparseOptimizer.ADAM: float(ADAM_STATES),
        SparseOptimizer.SGD: 0.0,
    }[kind]


# ------------------------------------------------------------------------------------------------- constraints


def plan_constraints(cfg: ExperimentConfig, schema: Schema) -> dict[str, ParameterConstraints]:
    """The trainer's constraints for a CUDA run, plus the synthetic data's pooling factors.

    The trainer's :func:`~supermoe_rec.distributed.sharding.sharding_constraints` checks ``train.sharding`` and
    keeps unlisted tables off ``data_parallel``; reusing it keeps this plan the one training would make.
    """
    constraints = sharding_constraints(cfg.train.sharding, schema, torch.device(COMPUTE_DEVICE))
    if cfg.data.source == "synthetic":
        # One pooling factor per feature of the table, in the table's feature order (as SparseArch builds it).
        history_ids_per_row = cfg.data.max_history / 2 / CANDIDATES_PER_GROUP
        pooling: dict[str, list[float]] = {}
        for features in (schema.sparse_features, schema.sequence_features):
            for f in features:
                pooling.setdefault(f.table, []).append(history_ids_per_row if f.per_group else 1.0)
        for table, factors in pooling.items():
            if table in constraints:
                constraints[table].pooling_factors = factors
            else:
                constraints[table] = ParameterConstraints(pooling_factors=factors)
    return constraints


# ---------------------------------------------------------------------------------------------------- planning


class _BestPlanStats(Stats):  # type: ignore[misc]
    """A planner Stats hook that keeps what the planner logs: the chosen (or last failed) proposal and counts."""

    def __init__(self) -> None:
        self.best_plan: list[Any] = []
        self.num_proposals = 0
        self.num_plans = 0
        self.run_time = 0.0

    def log(self, *args: Any, **kwargs: Any) -> None:
        self.best_plan = list(kwargs.get("best_plan") or [])
        self.num_proposals = int(kwargs.get("num_proposals", 0))
        self.num_plans = int(kwargs.get("num_plans", 0))
        self.run_time = float(kwargs.get("run_time", 0.0))


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_planner() -> Iterator[None]:
    """Hide three expected planner messages that would read as problems here.

    - the Topology "constructed directly" warning: the trainer builds its Topology the same way;
    - "Sharding spec not found" for data-parallel tables: they have no spec by design;
    - HeuristicalStorageReservation's FutureWarning about dry runs over-estimating dense memory: the reason it
      gives is the one we address by passing ``dense_tensor_estimate``.
    """
    targets = [logging.getLogger(), logging.getLogger("torchrec.distributed.planner.types")]
    drop = _DropMessages(("The topology was constructed directly", "Sharding spec not found"))
    for logger in targets:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
            yield
    finally:
        for logger in targets:
            logger.removeFilter(drop)


def _rank_ranges(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    ordered = sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"max": max(values), "mean": sum(values) / len(values), "min": min(values)}


@dataclass(frozen=True)
class _DenseMemory:
    """Per-rank bytes of what the planner does not shard: dense replicated and (expert-parallel) expert weights."""

    experts: int  # local expert weights + Adam states
    dense: int  # replicated dense weights + Adam states
    gradients: int  # fp32 gradient of both, plus DDP's bucket copy for the replicated part

    @property
    def total(self) -> int:
        return self.experts + self.dense + self.gradients


def _dense_memory(params: dict[str, int], expert_parallel: bool, world_size: int) -> _DenseMemory:
    experts_local = params["experts"] // world_size if expert_parallel else params["experts"]
    replicated = params["dense"] - params["experts"] if expert_parallel else params["dense"]
    return _DenseMemory(
        experts=experts_local * FP32_BYTES * (1 + ADAM_STATES),
        dense=replicated * FP32_BYTES * (1 + ADAM_STATES),
        gradients=(experts_local + 2 * replicated) * FP32_BYTES,
    )


def _min_ranks(
    embedding_bytes: int, params: dict[str, int], num_experts: int | None, cluster: ClusterSpec
) -> int | None:
    """Fewest ranks (a multiple of the host size; under expert parallelism also a divisor of E, ``num_experts``)
    whose usable HBM holds the tables' weights and optimizer state plus the per-rank dense/expert memory.

    A lower bound: the planner's lookup buffers come on top. None when no such world size exists.
    """
    usable = cluster.hbm_gb * GIB * (1 - RESERVED_HBM_FRACTION)
    expert_parallel = num_experts is not None

    def fits(w: int) -> bool:
        return embedding_bytes / w + _dense_memory(params, expert_parallel, w).total <= usable

    step = cluster.local_world_size
    if num_experts is not None:
        # The trainer's expert group is the whole world, so W must divide E.
        return next((w for w in range(step, num_experts + 1, step) if num_experts % w == 0 and fits(w)), None)
    k_hi = 1
    while not fits(k_hi * step):
        k_hi *= 2
        if k_hi * step > 1 << 24:
            return None  # the replicated part alone exceeds a rank's usable HBM: more ranks never help
    k_lo = k_hi // 2  # does not fit (or 0); fits() is monotone in W, so bisect between the two
    while k_hi - k_lo > 1:
        mid = (k_lo + k_hi) // 2
        if fits(mid * step):
            k_hi = mid
        else:
            k_lo = mid
    return k_hi * step


def plan_config(cfg: ExperimentConfig, cluster: ClusterSpec, config_name: str = "config") -> PlanReport:
    """Plan ``cfg``'s tables on ``cluster`` with TorchRec's planner and account every rank's memory.

    Raises:
        PlanError: the model does not fit (the message gives the memory needed and available, and how many ranks
            or how much HBM would do), or expert parallelism cannot split E experts over W ranks.
        ConfigError: the config cannot be planned (data source without table sizes, bad ``train.sharding``).
    """
    start = time.perf_counter()
    cluster = cluster.validated()
    W = cluster.world_size
    moe = cfg.model.moe
    expert_parallel = cfg.train.expert_parallel and cfg.model.arch is Arch.SUPERMOE
    if expert_parallel and moe.num_experts % W:
        raise PlanError(
            f"{config_name}: train.expert_parallel splits E/W experts per rank, but "
            f"model.moe.num_experts={moe.num_experts} is not a multiple of --world-size {W}"
        )
    lookup = resolve_sequence_lookup(cfg.model.sequence_lookup, torch.device(COMPUTE_DEVICE))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sequence_lookup=lookup))
    schema = plan_schema(cfg)
    module = build_meta_module(cfg, schema)
    params = count_parameters(module.model)
    dense_mem = _dense_memory(params, expert_parallel, W)

    # Table sizes from the built collections (a table shared by pooled and sequence features is built in both).
    sparse_arch = module.model.sparse_arch
    assert isinstance(sparse_arch, SparseArch)
    table_shapes: dict[str, tuple[int, int]] = {}
    table_params: dict[str, int] = {}
    for name, p in sparse_arch.named_parameters():
        table = name.split(".")[-2]  # ebc.embedding_bags.<table>.weight / sequence_ec.embeddings.<table>.weight
        rows, dim = int(p.shape[0]), int(p.shape[1])
        table_shapes[table] = (rows, dim)
        table_params[table] = table_params.get(table, 0) + rows * dim
    optimizer = cfg.train.sparse_optimizer
    weight_bytes_total = sum(table_params.values()) * FP32_BYTES
    optimizer_bytes_total = sum(
        math.ceil(n * FP32_BYTES * optimizer_state_per_weight(optimizer, table_shapes[t][1]))
        for t, n in table_params.items()
    )

    def does_not_fit(reason: str) -> PlanError:
        hbm = cluster.hbm_gb * GIB
        usable = hbm * (1 - RESERVED_HBM_FRACTION)
        embedding_bytes = weight_bytes_total + optimizer_bytes_total
        needed = embedding_bytes + W * dense_mem.total
        per_rank = embedding_bytes / W + dense_mem.total
        fewest = _min_ranks(embedding_bytes, params, moe.num_experts if expert_parallel else None, cluster)
        if fewest is not None:
            more_ranks = f"at least ~{fewest} ranks of {cluster.hbm_gb:g} GiB"
        elif expert_parallel:
            more_ranks = f"more HBM (no world size dividing model.moe.num_experts={moe.num_experts} fits)"
        else:
            more_ranks = "more HBM (the replicated part alone exceeds a rank)"
        return PlanError(
            f"{config_name}: does not fit on {W} ranks x {cluster.hbm_gb:g} GiB HBM "
            f"(+{cluster.ddr_gb:g} GiB DDR each for UVM). The model state needs ~{needed / GIB:,.1f} GiB: tables "
            f"{weight_bytes_total / GIB:,.1f} GiB + {optimizer.value} state {optimizer_bytes_total / GIB:,.1f} GiB "
            f"(sharded), and per rank {dense_mem.total / GIB:,.2f} GiB of experts, dense weights, Adam states and "
            f"gradients; that is ~{per_rank / GIB:,.1f} GiB per rank against {usable / GIB:,.1f} GiB usable "
            f"({cluster.hbm_gb:g} GiB HBM less the planner's {RESERVED_HBM_FRACTION:.0%} margin), "
            f"{W * hbm / GIB:,.0f} GiB HBM in all. Use {more_ranks}, or ~{per_rank / usable * cluster.hbm_gb:,.0f} "
            f"GiB of HBM per rank at {W} ranks. Planner: {reason}"
        )

    with _quiet_planner():
        topology = Topology(
            world_size=W,
            compute_device=COMPUTE_DEVICE,
            hbm_cap=int(cluster.hbm_gb * GIB),
            ddr_cap=int(cluster.ddr_gb * GIB),
            local_world_size=cluster.local_world_size,
        )
        proposers: list[Any] = [GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]
        grid_max = GRID_SEARCH_BUDGET // W
        proposers.insert(0, GridSearchProposer(max_proposals=grid_max))
        stats = _BestPlanStats()
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=cfg.train.batch_size,
            storage_reservation=HeuristicalStorageReservation(
                percentage=RESERVED_HBM_FRACTION, dense_tensor_estimate=max(1, dense_mem.total)
            ),
            proposer=proposers,
            stats=stats,
            constraints=plan_constraints(cfg, schema),
            debug=False,
        )
        try:
            planner.plan(module, sharders())
        except PlannerError as exc:
            # The first line states the failure (no plan / negative HBM left after the reservation); the rest
            # is the planner's generic advice, which the message above makes concrete.
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise does_not_fit(first[:400]) from exc
    best = stats.best_plan
    if not best:
        raise PlanError(f"{config_name}: the planner returned no plan (no shardable tables?)")

    # Per-rank sums over the chosen shards.
    hbm = [0] * W
    ddr = [0] * W
    weights = [0] * W
    opt_state = [0] * W
    perf_parts = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "input_dist_comms", "prefetch_compute")
    perf = {part: [0.0] * W for part in perf_parts}
    tables: list[dict[str, Any]] = []
    for so in sorted(best, key=lambda s: -table_params.get(s.name, 0)):
        rows, dim = table_shapes[so.name]
        per_weight = optimizer_state_per_weight(optimizer, dim)
        ranks: list[int] = []
        table_perf = 0.0
        for shard in so.shards:
            r = int(shard.rank)
            ranks.append(r)
            hbm[r] += int(shard.storage.hbm)
            ddr[r] += int(shard.storage.ddr)
            shard_weight_bytes = math.prod(shard.size) * FP32_BYTES
            weights[r] += shard_weight_bytes
            opt_state[r] += math.ceil(shard_weight_bytes * per_weight)
            for part in perf_parts:
                perf[part][r] += float(getattr(shard.perf, part, 0.0))
            table_perf += float(shard.perf.total)
        tables.append(
            {
                "name": so.name,
                "fqn": so.fqn,
                "rows": rows,
                "dim": dim,
                "params": table_params[so.name],
                "sharding_type": so.sharding_type,
                "compute_kernel": so.compute_kernel,
                "ranks": _rank_ranges(ranks),
                "num_ranks": len(set(ranks)),
                "num_shards": len(so.shards),
                "storage_bytes": {"hbm": int(so.total_storage.hbm), "ddr": int(so.total_storage.ddr)},
                "perf_ms": table_perf,
            }
        )
    rank_perf = [sum(perf[part][r] for part in perf_parts) for r in range(W)]
    slowest = max(range(W), key=lambda r: rank_perf[r])
    usable_hbm = int(cluster.hbm_gb * GIB * (1 - RESERVED_HBM_FRACTION)) - dense_mem.total
    memory = {
        "embeddings": {"hbm": _stats(hbm), "ddr": _stats(ddr)},
        "embedding_weights": _stats(weights),
        "embedding_optimizer": _stats(opt_state),
        "experts": dense_mem.experts,
        "dense": dense_mem.dense,
        "gradients": dense_mem.gradients,
        "total_max": max(hbm) + dense_mem.total,
        "hbm_capacity": int(cluster.hbm_gb * GIB),
        "hbm_usable_for_tables": usable_hbm,
    }
    moe_layers = sum(1 for m in module.model.modules() if isinstance(m, BatchedExperts))
    params_out: dict[str, Any] = {
        **params,
        "dense_replicated": params["dense"] - (params["experts"] if expert_parallel else 0),
        "moe_layers": moe_layers,
        "experts_per_layer": moe.num_experts if moe_layers else 0,
        "experts_per_rank_per_layer": (moe.num_experts // W if expert_parallel else moe.num_experts)
        if moe_layers
        else 0,
        "expert_parallel": expert_parallel,
        "per_table": dict(sorted(table_params.items(), key=lambda kv: -kv[1])),
    }
    report = PlanReport(
        config=config_name,
        cluster={
            "world_size": W,
            "local_world_size": cluster.local_world_size,
            "hbm_gb": cluster.hbm_gb,
            "ddr_gb": cluster.ddr_gb,
            "compute_device": COMPUTE_DEVICE,
        },
        batch_size_per_rank=cfg.train.batch_size,
        sparse_optimizer=optimizer.value,
        sequence_lookup=lookup.value,
        params=params_out,
        tables=tables,
        memory_per_rank_bytes=memory,
        embedding_bytes_total={
            "weights": weight_bytes_total,
            "optimizer": optimizer_bytes_total,
            "storage_hbm": sum(hbm),
            "storage_ddr": sum(ddr),
        },
        perf_ms={
            "max_rank_total": rank_perf[slowest],
            "slowest_rank": slowest,
            **{part: perf[part][slowest] for part in perf_parts},
            "mean_rank_total": sum(rank_perf) / W,
        },
        planner={
            "proposers": [type(p).__name__ for p in proposers],
            "grid_search_max_proposals": grid_max,
            "proposals": stats.num_proposals,
            "plans": stats.num_plans,
            "seconds": round(stats.run_time, 3),
            "batch_size": cfg.train.batch_size,
        },
        where_parameters_live="",
        elapsed_s=0.0,
    )
    report.where_parameters_live = explain(report)
    report.elapsed_s = round(time.perf_counter() - start, 3)
    return report


# ----------------------------------------------------------------------------------------------------- output


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= 0.9995 * scale:  # so that 999.96e9 reads 1T, not 1e+03B
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def explain(report: PlanReport) -> str:
    """One paragraph on where the parameters live (tables, experts, dense) and how each part is spread."""
    p = report.params
    total = p["total"]
    W = report.cluster["world_size"]
    big = [t for t in report.tables if t["params"] >= 0.01 * total]
    table_part = ", ".join(
        f"{t['name']} ({_count(t['params'])}, {t['sharding_type']} over {t['num_ranks']} rank(s))" for t in big
    )
    text = f"{100 * p['embedding'] / total:.1f}% of the {_count(total)} parameters are in the embedding tables"
    text += f": {table_part}" if table_part else ""
    text += "."
    if p["experts"]:
        share = f"{100 * p['experts'] / total:.1f}% ({_count(p['experts'])}) are experts"
        layout = f"{p['moe_layers']} MoE layer(s) x {p['experts_per_layer']} experts"
        if p["expert_parallel"]:
            text += (
                f" {share}, {layout}, split by expert parallelism: each rank holds "
                f"{p['experts_per_rank_per_layer']} expert(s) per layer (E/W = {p['experts_per_layer']}/{W}), "
                f"{_gib(report.memory_per_rank_bytes['experts'])} with Adam states."
            )
        else:
            text += f" {share}, {layout}, replicated on every rank (train.expert_parallel is off)."
    text += (
        f" The remaining {_count(p['dense_replicated'])} dense parameters are replicated on all {W} ranks"
        f" ({100 * p['dense_replicated'] / total:.2f}%)."
    )
    return text


def format_report(report: PlanReport) -> str:
    """The human-readable summary ``supermoe-rec plan`` prints."""
    p = report.params
    c = report.cluster
    mem = report.memory_per_rank_bytes
    lines = [
        f"plan {report.config}: {c['world_size']} ranks ({c['local_world_size']} per host) x {c['hbm_gb']:g} GiB HBM "
        f"(+{c['ddr_gb']:g} GiB DDR), batch {report.batch_size_per_rank}/rank, sparse optimizer "
        f"{report.sparse_optimizer}, sequence lookup {report.sequence_lookup}",
        f"params: total {p['total']:,} ({_count(p['total'])}) = embedding {p['embedding']:,} + experts "
        f"{p['experts']:,} + other dense {p['dense'] - p['experts']:,}",
    ]
    rows = [
        [
            t["name"],
            f"{t['rows']:,}",
            t["dim"],
            _count(t["params"]),
            t["sharding_type"],
            t["compute_kernel"],
            t["ranks"],
            _gib(t["storage_bytes"]["hbm"] + t["storage_bytes"]["ddr"]),
        ]
        for t in report.tables
    ]
    lines.append(
        tabulate(rows, headers=["table", "rows", "dim", "params", "sharding", "kernel", "ranks", "storage (all)"])
    )
    emb = mem["embeddings"]
    lines += [
        "memory per rank:",
        f"  embeddings + optimizer (planner): HBM max {_gib(emb['hbm']['max'])}, mean {_gib(emb['hbm']['mean'])}"
        + (f"; DDR max {_gib(emb['ddr']['max'])}" if emb["ddr"]["max"] else ""),
        f"    of which weights max {_gib(mem['embedding_weights']['max'])}, {report.sparse_optimizer} state max "
        f"{_gib(mem['embedding_optimizer']['max'])}, the rest lookup buffers",
        f"  experts (weights + Adam): {_gib(mem['experts'])}; dense replicated (weights + Adam): {_gib(mem['dense'])};"
        f" gradients: {_gib(mem['gradients'])}",
        f"  total (max rank): {_gib(mem['total_max'])} of {_gib(mem['hbm_capacity'])}",
    ]
    perf = report.perf_ms
    lines.append(
        f"estimated embedding time per step (slowest rank {perf['slowest_rank']}): {perf['max_rank_total']:.2f} ms "
        f"= fwd compute {perf['fwd_compute']:.2f} + fwd comms {perf['fwd_comms']:.2f} + bwd compute "
        f"{perf['bwd_compute']:.2f} + bwd comms {perf['bwd_comms']:.2f}"
        + (f" + prefetch {perf['prefetch_compute']:.2f}" if perf["prefetch_compute"] else "")
        + f" (mean over ranks {perf['mean_rank_total']:.2f} ms)"
    )
    pl = report.planner
    lines.append(f"planner: {pl['proposals']} proposals, {pl['plans']} plans, {pl['seconds']:.1f} s")
    lines.append(f"total: {report.elapsed_s:.1f} s")
    lines.append(f"where the parameters live: {report.where_parameters_live}")
    return "\n".join(lines)


def plan_command(
    config: str,
    overrides: Sequence[str],
    cluster: ClusterSpec,
    json_path: str | None = None,
) -> PlanReport:
    """Load ``config`` (+ overrides), plan it on ``cluster``, and write the JSON report when asked."""
    from supermoe_rec.data.output import check_output, write_json

    cfg = load_config(config, overrides)
    path = check_output(json_path, "--json", inputs=[config]) if json_path is not None else None  # before planning
    report = plan_config(cfg, cluster, config_name=config)
    if path is not None:
        write_json(path, report.as_dict())  # through a temporary file renamed into place
    return report
