"""A streaming, deterministic synthetic generator for scale and speed work (never for quality claims).

- ids are Zipf-distributed over configurable table sizes (up to 10^8 rows and beyond: nothing is materialised
  per id; an id's latent vector is a hash of the id);
- histories have variable length (0 .. max_history, empty included);
- T binary tasks share a planted signal: task t's logit is ``rho * s + sqrt(1 - rho^2) * e_t`` where s is the
  user-item affinity shared by all tasks and e_t a task-specific affinity, so ``synthetic_task_correlation``
  (rho) sets how related the tasks are;
- task t is labelled on a random ``synthetic_label_rates[t]`` fraction of rows (task masks).

Batch b of epoch e is a pure function of (seed, e, b), so the stream is reproducible, streamable, and the same
samples are produced whatever the world size (rank r takes global batches r, r + W, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.schema import Schema

log = logging.getLogger(__name__)

LATENT_DIM = 8
CANDIDATES_PER_GROUP = 2  # like ml-mt: a user-side pass shared by two candidates
USER_SEGMENTS = 64


def synthetic_schema(cfg: DataConfig) -> Schema:
    """The schema the synthetic batches follow (tables sized by the config)."""
    if len(cfg.synthetic_label_rates) < cfg.synthetic_tasks:
        raise ValueError(
            f"data.synthetic_label_rates: {len(cfg.synthetic_label_rates)} rate(s) for "
            f"{cfg.synthetic_tasks} task(s); give one rate per task"
        )
    return Schema.from_dict(
        {
            "name": "synthetic",
            "user_column": "user",
            "group_column": "group",
            "tables": [
                {"name": "user", "num_embeddings": cfg.synthetic_users},
                {"name": "segment", "num_embeddings": USER_SEGMENTS},
                {"name": "item", "num_embeddings": cfg.synthetic_items},
            ],
            "sparse_features": [
                {"name": "user", "column": "user", "table": "user", "side": "user"},
                {"name": "segment", "column": "segment", "table": "segment", "side": "user"},
            ],
            "sequence_features": [
                {"name": "history", "column": "history", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "target_item", "column": "item", "table": "item"},
            ],
            "tasks": [{"name": f"task_{t}", "type": "binary", "label": f"y{t}"} for t in range(cfg.synthetic_tasks)],
        },
        source="synthetic",
    )


def zipf_ids(rng: np.random.Generator, n: int, size: int, exponent: float) -> IntArray:
    """``size`` ids in [0, n) with P(id = k) ≈ (k + 1)^-exponent, by inverting the continuous CDF (O(size) memory).

    Example::

        >>> ids = zipf_ids(np.random.default_rng(0), 10**8, 100_000, 1.1)
        >>> bool(ids.min() >= 0 and ids.max() < 10**8), bool((ids == 0).mean() > 0.05)
        (True, True)
    """
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(float(n) + 1.0, u)  # log-uniform: the s = 1 limit
    else:
        a = 1.0 - exponent
        x = np.power((np.power(n + 1.0, a) - 1.0) * u + 1.0, 1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


def _hash_latent(ids: IntArray, salt: int) -> npt.NDArray[np.float64]:
    """A fixed pseudo-random N(0, 1) vector [LATENT_DIM] per id, from a splitmix64 hash (no per-id storage)."""
    with np.errstate(over="ignore"):
        lane = np.arange(LATENT_DIM, dtype=np.uint64)
        x = np.asarray(ids.astype(np.uint64)[:, None] * np.uint64(LATENT_DIM) + lane, dtype=np.uint64)
        x = x + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u1 = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = ((x & np.uint64(0xFFFF)).astype(np.float64) + 0.5) / float(1 << 16)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class SyntheticStream:
    """Yield one rank's synthetic batches for an epoch.

    Args:
        cfg: data config (table sizes, sample count, tasks, Zipf exponent, correlation, label rates).
        batch_size: rows per batch (a multiple of the candidates per group).
        rank: this process's rank.
        world_size: number of ranks.

    Example::

        >>> cfg = DataConfig(source="synthetic", synthetic_samples=64, synthetic_items=10**8)
        >>> batches = list(SyntheticStream(cfg, batch_size=16))
        >>> len(batches), batches[0].labels.shape, batches[0].num_groups
        (4, torch.Size([16, 3]), 8)
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.schema = synthetic_schema(cfg)
        self.cfg = cfg
        self.groups_per_batch = max(1, batch_size // CANDIDATES_PER_GROUP)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        global_batches = math.ceil(cfg.synthetic_samples / (self.groups_per_batch * CANDIDATES_PER_GROUP))
        self.num_batches = global_batches // world_size
        if global_batches % world_size:
            log.info(
                "synthetic: %d global batches do not divide over %d ranks; the last %d are not generated",
                global_batches,
                world_size,
                global_batches % world_size,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.num_batches):
            yield self.make_batch(b * self.world_size + self.rank)

    def make_batch(self, global_index: int) -> Batch:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, global_index])
        g, c, t = self.groups_per_batch, CANDIDATES_PER_GROUP, cfg.synthetic_tasks
        users = zipf_ids(rng, cfg.synthetic_users, g, cfg.synthetic_zipf)
        hist_len = rng.integers(0, cfg.max_history + 1, size=g)
        history = zipf_ids(rng, cfg.synthetic_items, int(hist_len.sum()), cfg.synthetic_zipf)
        targets = zipf_ids(rng, cfg.synthetic_items, g * c, cfg.synthetic_zipf)

        # Planted signal: the user's taste is its own latent plus the mean latent of its history.
        hist_owner = np.repeat(np.arange(g), hist_len)
        taste = _hash_latent(users, salt=1)
        np.add.at(taste, hist_owner, _hash_latent(history, salt=2) / np.maximum(hist_len, 1)[hist_owner, None])
        taste = np.repeat(taste, c, axis=0)  # (G*C, LATENT_DIM)
        item_vec = _hash_latent(targets, salt=2)
        shared = (taste * item_vec).sum(1) / math.sqrt(2 * LATENT_DIM)
        rho = cfg.synthetic_task_correlation
        labels = np.zeros((g * c, t), dtype=np.float32)
        mask = np.zeros((g * c, t), dtype=np.float32)
        for task in range(t):
            own = (taste * _hash_latent(targets, salt=10 + task)).sum(1) / math.sqrt(2 * LATENT_DIM)
            logit = 2.0 * (rho * shared + math.sqrt(1.0 - rho * rho) * own)
            labels[:, task] = rng.random(g * c) < 1.0 / (1.0 + np.exp(-logit))
            mask[:, task] = rng.random(g * c) < cfg.synthetic_label_rates[task]
        labels *= mask

        rows_user = np.repeat(users, c)
        leader = np.zeros(g * c, dtype=bool)
        leader[::c] = True
        seq_lengths = np.zeros(g * c, dtype=np.int64)
        seq_lengths[leader] = hist_len
        sparse = KeyedJaggedTensor(
            keys=["user", "segment"],
            values=torch.from_numpy(np.concatenate([rows_user, rows_user % USER_SEGMENTS])),
            lengths=torch.ones(2 * g * c, dtype=torch.int32),
            stride=g * c,
        )
        sequence = KeyedJaggedTensor(
            keys=["history", "target_item"],
            values=torch.from_numpy(np.concatenate([history, targets])),
            lengths=torch.from_numpy(np.concatenate([seq_lengths, np.ones(g * c, dtype=np.int64)]).astype(np.int32)),
            stride=g * c,
        )
        return Batch(
            sparse_features=sparse,
            sequence_features=sequence,
            dense_features=torch.zeros(g * c, 0),
            labels=torch.from_numpy(labels),
            task_mask=torch.from_numpy(mask),
            group_index=torch.from_numpy(np.repeat(np.arange(g, dtype=np.int64), c)),
            user_index=torch.from_numpy(rows_user),
        )
