"""Strict, frozen run configuration: ``data``, ``model`` and ``train`` sections loaded from YAML.

Every section is a frozen dataclass. Loading is strict: an unknown key, a value of the wrong type or a missing file
raises :class:`ConfigError` naming the dotted key (``model.moe.top_k``) or the path. CLI overrides use the same
dotted keys::

    supermoe-rec train --config configs/ml100k.yaml --train.lr=0.01 --model.moe.num_experts=16

Override values are parsed as YAML scalars/flow collections (``--model.towers.hidden=[64,32]``) and then checked
against the field's annotation exactly like file values.

Sections, by concern::

    data:   where samples come from and how they are built
    model:  arch, embedding_dim, sequence_lookup,
            encoder: (transformer archs), moe: (its MoE FFNs), mlp: (MLP archs), towers: (all archs)
    train:  optimisation, loss: (task weights, regression loss, MoE loss weights), sharding, expert_parallel,
            early stopping, checkpoints and outputs

Example::

    >>> cfg = ExperimentConfig()
    >>> cfg = apply_overrides(cfg, ["--train.lr=0.01", "--model.moe.top_k=1"])
    >>> cfg.train.lr, cfg.model.moe.top_k
    (0.01, 1)
    >>> apply_overrides(cfg, ["--train.lrr=0.01"])
    Traceback (most recent call last):
    ...
    supermoe_rec.config.base.ConfigError: train.lrr: unknown key (known: ...)
    >>> apply_overrides(cfg, ["--model.d_model=32"])  # a key of the earlier flat layout names its new place
    Traceback (most recent call last):
    ...
    supermoe_rec.config.base.ConfigError: model.d_model: this key moved to model.encoder.d_model
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from supermoe_rec.config.base import MOVED_KEYS as MOVED_KEYS
from supermoe_rec.config.base import REMOVED_KEYS as REMOVED_KEYS
from supermoe_rec.config.base import ConfigError as ConfigError
from supermoe_rec.config.base import from_dict as from_dict
from supermoe_rec.config.base import read_utf8, unknown_key_error
from supermoe_rec.config.base import to_dict as to_dict
from supermoe_rec.config.tasks import TaskType as TaskType
from supermoe_rec.data.schema import check_table_config


class Arch(str, enum.Enum):
    """Which model ``model.arch`` builds. All share one SparseArch, so comparisons are fair."""

    SUPERMOE = "supermoe"
    DENSE_TRANSFORMER = "dense_transformer"
    SHARED_BOTTOM = "shared_bottom"
    MMOE = "mmoe"
    PLE = "ple"
    SINGLE_TASK = "single_task"


class RegressionLoss(str, enum.Enum):
    MSE = "mse"
    HUBER = "huber"


class SequenceLookup(str, enum.Enum):
    """How sequence ids are looked up (docs/design.md#embedding-lookup-speed-on-cpu).

    ``embedding_collection``: an unpooled TorchRec EmbeddingCollection.
    ``bags_of_one``: an EmbeddingBagCollection where every sequence position is a bag of length 1; on CPU its
    backward is several times faster than the unpooled EC. ``auto`` picks per device.
    """

    AUTO = "auto"
    EMBEDDING_COLLECTION = "embedding_collection"
    BAGS_OF_ONE = "bags_of_one"


class SparseOptimizer(str, enum.Enum):
    """The optimizer fused into the embedding tables' backward (TorchRec/fbgemm TBE)."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    ADAM = "adam"
    SGD = "sgd"


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are built.

    ``source`` is ``ml100k`` or ``ml1m`` (the ml-mt protocol over MovieLens), ``table`` (bring your own
    interaction table + ``schema`` YAML) or ``synthetic`` (streaming generator for scale and speed work).
    """

    source: str = "ml100k"
    cache_dir: str = "~/.cache/supermoe_rec"
    # Try the GroupLens URL before the offline fallback (the copy inside the recbole wheel).
    try_url: bool = True
    url_timeout_s: float = 5.0
    seed: int = 0
    max_history: int = 50
    # Generative training: the most items one causal pass holds. A longer user is encoded as overlapping chunks
    # (each target once, with the encoder's receptive field as context before it); docs/protocol.md.
    chunk_length: int = 256
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    # Instead of the fractions: each user's last rating is test and the one before it valid, equal timestamps in
    # file order: RecBole's sequential next-item protocol (docs/protocol.md), for retrieval comparisons.
    leave_one_out: bool = False
    # Item-sequence files (source: amazon_beauty | amazon_sports read <sequences_dir>/Beauty.txt or
    # Sports_and_Outdoors.txt; source: sequences reads data.table). See supermoe_rec/data/sequences.py.
    sequences_dir: str = "data/amazon"
    # Empty: every task the schema defines. Otherwise a subset, e.g. ["watch"] for a single-task model.
    tasks: tuple[str, ...] = ()
    # The future items of each sample, the positives of the next-items objective (train.objective): the next
    # next_window items of the user (1: the next item; >1: PinnerFormer's future window), within the sample's split,
    # and within next_horizon_days of the sample when that is > 0. 0 builds no future items.
    next_window: int = 0
    next_horizon_days: float = 0.0
    # Schema features to remove before samples are built, e.g. the user profile for a behaviour-only model.
    drop_features: tuple[str, ...] = ()
    # Bring-your-own data (source: table).
    schema: str | None = None
    table: str | None = None
    valid_table: str | None = None
    test_table: str | None = None
    # Synthetic data (source: synthetic).
    synthetic_users: int = 100_000
    synthetic_items: int = 1_000_000
    synthetic_samples: int = 1_000_000
    synthetic_tasks: int = 3
    synthetic_zipf: float = 1.1
    synthetic_task_correlation: float = 0.5
    synthetic_label_rates: tuple[float, ...] = (1.0, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderConfig:
    """The transformer encoder of the transformer archs (``supermoe``, ``dense_transformer``).

    Dimension letters: D model dim (``d_model``), T tasks.
    """

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # Hidden width of the dense FFN (dense blocks and the dense_transformer arch).
    ffn_hidden: int = 128
    use_task_tokens: bool = True
    # Add (task representation) ⊙ (item projected to the model dim) to every tower input of the transformer archs,
    # so the towers see an explicit user-item match instead of having to learn one from a concatenation.
    item_interaction: bool = True
    # Residual and attention dropout of the encoder.
    dropout: float = 0.0
    # Generative training: one causal pass over each user's sequence scores every sample of that user from the state
    # before its target (supermoe_rec/modules/causal.py; docs/design.md#generative-training-one-causal-pass-per-user).
    # false: the per-group encoder, one bidirectional pass per (user, position) group (the reference twin).
    generative: bool = False

    def receptive_field(self, window: int) -> int:
        """Items a causal token's output can depend on with a ``window``-item band: every attention (the blocks,
        and the task readout with task tokens) reaches ``window - 1`` items further back."""
        return (self.num_layers + int(self.use_task_tokens)) * (window - 1) + 1


class ScoreFunc(str, enum.Enum):
    """How the MoE router scores experts (``model.moe.score_func``)."""

    SOFTMAX = "softmax"  # probabilities over the E experts
    SIGMOID = "sigmoid"  # an independent score per expert; the top-k weights are normalised to sum to 1


class LoadBalance(str, enum.Enum):
    """How the MoE router keeps the experts' load even (``model.moe.load_balance``)."""

    AUX_LOSS = "aux_loss"  # the load-balancing loss, weighted by train.loss.balance_loss_weight
    BIAS = "bias"  # auxiliary-loss-free: a per-expert selection bias moved by ±bias_update_rate after each step
    NONE = "none"


@dataclass(frozen=True)
class MoEConfig:
    """Sparse Mixture-of-Experts FFN (GShard/Switch style): its shape and its routing.

    Dimension letters: E experts, K top-k, H expert hidden width, C capacity per expert. The auxiliary loss weights
    are ``train.loss.balance_loss_weight`` / ``train.loss.z_loss_weight``; expert parallelism is
    ``train.expert_parallel``.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    dropless: bool = False
    # Training-only router perturbations: multiplicative input jitter (Switch) and additive logit noise.
    router_jitter: float = 0.0
    router_noise: float = 0.0
    # Every moe_every-th encoder block uses the MoE FFN (1: all blocks). dense_transformer gives those blocks a dense
    # FFN of the same active width, K * H.
    moe_every: int = 2
    # One router per token kind ([USER], each task token, history) on top of the shared one, so the task tokens can
    # choose their own experts; the extra routers start at zero, i.e. at shared routing.
    task_routers: bool = False
    # Always-active experts of width expert_hidden, added to the routed output (DeepSeekMoE). 0 keeps the plain MoE.
    num_shared_experts: int = 0
    # softmax, or sigmoid per expert with the top-k weights normalised (supermoe_rec.modules.gating).
    score_func: ScoreFunc = ScoreFunc.SOFTMAX
    # aux_loss | bias (auxiliary-loss-free: a per-expert bias added to the scores for the top-k choice only, moved by
    # ±bias_update_rate after every optimizer step towards even load; saved in checkpoints) | none.
    load_balance: LoadBalance = LoadBalance.AUX_LOSS
    bias_update_rate: float = 0.001


@dataclass(frozen=True)
class MLPConfig:
    """The MLP backbones (``shared_bottom``, ``mmoe``, ``ple``, ``single_task``): expert/bottom widths and counts."""

    bottom_hidden: tuple[int, ...] = (128, 64)
    mmoe_experts: int = 4
    ple_shared_experts: int = 2
    ple_task_experts: int = 1
    ple_levels: int = 2


@dataclass(frozen=True)
class TowersConfig:
    """The per-task towers every arch ends in."""

    hidden: tuple[int, ...] = (64,)
    # Every tower also reads the [USER] vector next to its task token (transformer archs), so the supervised tasks
    # shape the universal vector too.
    read_user: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Model shape, by concern: ``arch`` picks the model; ``encoder`` + ``moe`` are read by the transformer archs,
    ``mlp`` by the MLP archs (:data:`ARCH_SECTIONS`), ``towers`` and the embeddings by all."""

    arch: Arch = Arch.SUPERMOE
    embedding_dim: int = 32
    sequence_lookup: SequenceLookup = SequenceLookup.AUTO
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    towers: TowersConfig = field(default_factory=TowersConfig)


# The arch-specific sections of ModelConfig each arch reads; the others change nothing for it.
ARCH_SECTIONS: dict[Arch, tuple[str, ...]] = {
    Arch.SUPERMOE: ("encoder", "moe"),
    Arch.DENSE_TRANSFORMER: ("encoder", "moe"),  # moe: which blocks are the K * H wide ones
    Arch.SHARED_BOTTOM: ("mlp",),
    Arch.MMOE: ("mlp",),
    Arch.PLE: ("mlp",),
    Arch.SINGLE_TASK: ("mlp",),
}
ARCH_SPECIFIC_SECTIONS = ("encoder", "moe", "mlp")


@dataclass(frozen=True)
class LossConfig:
    """The task-indicator loss: per-task weighting, the regression loss and the MoE auxiliary losses' weights."""

    # Static per-task loss weights w_t (missing tasks weigh 1.0), or learned by uncertainty weighting.
    task_weights: dict[str, float] = field(default_factory=dict)
    uncertainty_weighting: bool = False
    regression_loss: RegressionLoss = RegressionLoss.MSE
    huber_delta: float = 1.0
    # α and β: the MoE load-balancing loss and router z-loss (archs without MoE layers have none of either).
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001


class Objective(str, enum.Enum):
    """What trains the model (docs/design.md#the-universal-vector).

    ``supervised``: the task towers' task-indicator loss. ``joint``: that plus ``train.next_items.weight`` times
    the next-items loss on the [USER] vector. ``next_items``: the next-items loss alone, self-supervised: no task
    label is read, so it can pretrain on a raw log (then fine-tune with ``train.init_from``).
    """

    SUPERVISED = "supervised"
    JOINT = "joint"
    NEXT_ITEMS = "next_items"


class NextItemsSoftmax(str, enum.Enum):
    """``full``: over the whole catalogue; ``sampled``: sampled + in-batch negatives with logQ; ``auto``: full up to
    ``train.next_items.full_softmax_max_items`` items."""

    AUTO = "auto"
    FULL = "full"
    SAMPLED = "sampled"


@dataclass(frozen=True)
class NextItemsConfig:
    """The next-items loss (supermoe_rec/objectives/next_items.py); its positives come from ``data.next_window``."""

    weight: float = 1.0
    softmax: NextItemsSoftmax = NextItemsSoftmax.AUTO
    full_softmax_max_items: int = 200_000
    # Sampled softmax: uniform draws per step (the same on every rank), in-batch negatives, logQ correction.
    num_sampled: int = 1024
    in_batch_negatives: bool = True
    logq_correction: bool = True
    temperature: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, loss, parallelism and run outputs."""

    name: str = "ml100k-supermoe"
    out_dir: str = "runs"
    seed: int = 0
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 512
    eval_batch_size: int = 4096
    lr: float = 1e-3
    sparse_lr: float = 0.05
    weight_decay: float = 0.0
    early_stopping_patience: int = 2
    loss: LossConfig = field(default_factory=LossConfig)
    objective: Objective = Objective.SUPERVISED
    next_items: NextItemsConfig = field(default_factory=NextItemsConfig)
    # Pretrain, then fine-tune: a run dir whose latest checkpoint initialises the model's weights (not the
    # optimizer, not the data position) before training starts.
    init_from: str | None = None
    sparse_optimizer: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD
    # Per-table sharding constraints, e.g. {item: column_wise}; the planner chooses a sharded layout for unlisted
    # tables. CPU (gloo) supports data_parallel, table_wise, column_wise, table_column_wise. A data_parallel table
    # is replicated and trained by the dense optimizer (train.lr), not train.sparse_optimizer. TorchRec's column
    # shards are at least 128 wide, so column_wise splits only tables with embedding_dim >= 256.
    sharding: dict[str, str] = field(default_factory=dict)
    # Split each MoE layer's E experts over the ranks (E/W each; supermoe_rec.distributed.expert_parallel) instead of
    # replicating them.
    expert_parallel: bool = False
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Intra-op CPU threads per process (0: torch's default). With several processes per host, 1 avoids
    # oversubscribing the cores (BENCHMARKS.md: 2 processes x 1 thread beat 1 x 2 on 2 cores).
    num_threads: int = 0
    # "loss" (valid task-indicator loss, lower is better) or "<task>.<metric>", e.g. "watch.auc".
    early_stopping_metric: str = "loss"
    # Write a checkpoint every N steps (and at every epoch end); 0 = only at epoch ends.
    checkpoint_every: int = 0
    # Continue from the run dir's latest checkpoint; an absent or unreadable checkpoint is an error.
    resume: bool = False
    # On resume, the hyper-parameters that may differ from the checkpoint's config: comma-separated dotted keys, e.g.
    # "train.lr,model.moe.top_k" (supermoe_rec/training/resume.py). Any other change to the config is refused.
    resume_allow_changes: str = ""
    # Start afresh in a run dir that holds a run (checkpoints or metrics.json), replacing it. Without it such a
    # run is refused: resume it (train.resume) or choose another train.name.
    overwrite: bool = False
    tensorboard: bool = True
    log_every: int = 50


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        transformer = self.model.arch in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER)
        if self.train.objective is not Objective.SUPERVISED:
            if self.data.next_window < 1:
                raise ConfigError(
                    f"data.next_window: train.objective={self.train.objective.value} trains on each sample's future "
                    "items; set data.next_window >= 1 (1: the next item)"
                )
            if not transformer:
                raise ConfigError(
                    f"train.objective: {self.train.objective.value} trains the [USER] vector, which only the "
                    "transformer archs (supermoe, dense_transformer) have"
                )
        if self.model.towers.read_user and not transformer:
            raise ConfigError(
                "model.towers.read_user: only the transformer archs (supermoe, dense_transformer) have [USER]"
            )
        if self.data.next_window < 0:
            raise ConfigError(f"data.next_window: must be >= 0, got {self.data.next_window}")
        generative = self.model.encoder.generative and transformer
        if generative and (self.data.next_window > 1 or self.data.next_horizon_days > 0):
            # Generative training predicts the next item at every position; a window of future items per position
            # is not built yet, and training on the next item alone while the config asks for more would be silent.
            raise ConfigError(
                "data.next_window: generative training (model.encoder.generative) scores the next item at every "
                "position; set data.next_window=1 and data.next_horizon_days=0, or model.encoder.generative=false "
                "for a window of future items"
            )
        if generative and self.data.chunk_length <= self.model.encoder.receptive_field(self.data.max_history):
            raise ConfigError(
                f"data.chunk_length: {self.data.chunk_length} must exceed the causal encoder's receptive field of "
                f"{self.model.encoder.receptive_field(self.data.max_history)} items (the context each chunk repeats)"
            )
        check_values(self)

    def trained_task_weights(self) -> dict[str, float]:
        """``train.loss.task_weights`` of the tasks this run trains: a config that weighs ``watch`` still trains
        ``--data.tasks=[like]``. With every task selected (``data.tasks: []``) all weights are kept, and the loss
        rejects a name that is not a task."""
        tasks = self.data.tasks
        return {name: w for name, w in self.train.loss.task_weights.items() if not tasks or name in tasks}


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]*")
_MAX_NAME_BYTES = 255


def check_run_name(name: str, key: str = "train.name") -> None:
    """``name`` must be one path component of safe characters, so ``<out_dir>/<name>`` stays inside ``out_dir``.

    Example::

        >>> check_run_name("ml100k-supermoe")
        >>> check_run_name("../escape")
        Traceback (most recent call last):
        ...
        supermoe_rec.config.base.ConfigError: train.name: '../escape' must be one path component ...
    """
    if not _SAFE_NAME.fullmatch(name) or len(name.encode()) > _MAX_NAME_BYTES:
        raise ConfigError(
            f"{key}: {name!r} must be one path component of letters, digits and . _ + = @ - (not starting with "
            f". or -, at most {_MAX_NAME_BYTES} bytes), so the run stays inside train.out_dir"
        )


def check_values(cfg: ExperimentConfig) -> None:
    """Values that would otherwise fail late, after data loading and model build, as errors naming the dotted key:
    sizes and counts below 1, ``model.moe.top_k`` above ``num_experts``, ``num_heads`` not dividing ``d_model``,
    an unsafe ``train.name``."""
    enc, moe, train = cfg.model.encoder, cfg.model.moe, cfg.train
    at_least_one = {
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.encoder.d_model": enc.d_model,
        "model.encoder.num_layers": enc.num_layers,
        "model.encoder.num_heads": enc.num_heads,
        "model.encoder.ffn_hidden": enc.ffn_hidden,
        "model.moe.num_experts": moe.num_experts,
        "model.moe.top_k": moe.top_k,
        "model.moe.expert_hidden": moe.expert_hidden,
        "model.moe.moe_every": moe.moe_every,
        "data.max_history": cfg.data.max_history,
        "train.batch_size": train.batch_size,
        "train.eval_batch_size": train.eval_batch_size,
        "train.log_every": train.log_every,
        **{f"model.towers.hidden[{i}]": h for i, h in enumerate(cfg.model.towers.hidden)},
        **{f"model.mlp.bottom_hidden[{i}]": h for i, h in enumerate(cfg.model.mlp.bottom_hidden)},
    }
    at_least_zero = {
        "train.epochs": train.epochs,
        "train.max_steps": train.max_steps if train.max_steps is not None else 0,
        "train.checkpoint_every": train.checkpoint_every,
        "train.num_threads": train.num_threads,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key}: must be at least 0, got {value}")
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"model.moe.top_k: {moe.top_k} is more than model.moe.num_experts ({moe.num_experts})")
    if enc.d_model % enc.num_heads:
        raise ConfigError(
            f"model.encoder.num_heads: {enc.num_heads} does not divide model.encoder.d_model ({enc.d_model})"
        )
    if not 0.0 <= enc.dropout < 1.0:
        raise ConfigError(f"model.encoder.dropout: must be in [0, 1), got {enc.dropout}")
    check_run_name(train.name)
    if train.resume and train.init_from:
        raise ConfigError(
            f"train.init_from: {train.init_from!r} cannot be combined with train.resume=true (a resume continues "
            "the run's own checkpoint); drop one of them"
        )
    if train.resume and train.overwrite:
        raise ConfigError("train.overwrite: cannot be combined with train.resume=true (it would replace the run)")
    check_early_stopping_metric(train.early_stopping_metric, cfg.data.tasks)


# What train.early_stopping_metric may name: a task metric (higher is better for the first two) or next-item ranking.
TASK_METRICS = ("auc", "gauc", "logloss", "rmse", "mae")
NEXT_ITEM_METRICS = ("hr@10", "ndcg@10", "mrr@10")


def check_early_stopping_metric(name: str, tasks: Sequence[str] = ()) -> None:
    """``train.early_stopping_metric`` is ``loss``, ``<task>.<metric>`` (metric one of :data:`TASK_METRICS`; the
    task among ``tasks`` when given) or ``next_item.<metric>`` (one of :data:`NEXT_ITEM_METRICS`)."""
    task, _, metric = name.partition(".")
    if name == "loss" or (task == "next_item" and metric in NEXT_ITEM_METRICS):
        return
    if task and task != "next_item" and metric in TASK_METRICS and (not tasks or task in tasks):
        return
    known = f" of the tasks {list(tasks)}" if tasks else ""
    raise ConfigError(
        f"train.early_stopping_metric: {name!r} is not a valid metric (use loss, <task>.<metric>{known} with metric "
        f"one of {', '.join(TASK_METRICS)}, or next_item.{'/'.join(NEXT_ITEM_METRICS)})"
    )


# The tasks of the built-in sources (a table's come from its schema); tests/test_reliability.py checks them against
# the data those sources build.
SOURCE_TASKS: dict[str, tuple[str, ...]] = {
    "ml100k": ("watch", "like", "rating"),
    "ml1m": ("watch", "like", "rating"),
    "amazon_beauty": ("click",),
    "amazon_sports": ("click",),
    "sequences": ("click",),
}


def check_source_tasks(cfg: ExperimentConfig) -> None:
    """``data.tasks`` and ``train.loss.task_weights`` name only tasks of a built-in ``data.source`` (a table's
    schema is checked by :func:`~supermoe_rec.data.schema.check_table_config`): one check for every source."""
    source = cfg.data.source
    known = SOURCE_TASKS.get(source)
    if known is None:
        return
    hint = f"; configs/{source}.yaml is a config for this source" if source.startswith("amazon_") else ""
    for key, names in (
        ("data.tasks", list(cfg.data.tasks)),
        ("train.loss.task_weights", list(cfg.trained_task_weights())),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"{key}: unknown task(s) {unknown}: data.source {source!r} has the tasks {list(known)}{hint}"
            )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML config file strictly, then apply ``--section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = read_utf8(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping with data/model/train sections")
    try:
        cfg: ExperimentConfig = from_dict(raw, ExperimentConfig)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    cfg = apply_overrides(cfg, overrides)
    # source: table: task names against the schema, ml-mt-only keys warned about (docs/data.md).
    check_table_config(cfg)
    check_source_tasks(cfg)
    return cfg


C = TypeVar("C")


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Apply ``--a.b.c=value`` (or ``a.b.c=value``) overrides; the value is parsed as a YAML scalar."""
    values = to_dict(cfg)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"{item}: overrides look like --section.key=value")
        dotted, raw_value = text.split("=", 1)
        parts = dotted.split(".")
        node: dict[str, Any] = values
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: depth + 1])}: unknown section")
            node = child
        if parts[-1] not in node:
            raise unknown_key_error(dotted, sorted(node))
        try:
            node[parts[-1]] = yaml.safe_load(raw_value) if raw_value != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{dotted}: cannot parse {raw_value!r}: {exc}") from exc
    return from_dict(values, type(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run or checkpoint keeps next to its outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
