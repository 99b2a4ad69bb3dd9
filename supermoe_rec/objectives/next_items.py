"""The next-items objective: trains the universal ``[USER]`` vector to rank the user's future items above the others.

Dimension letters: G groups (one user pass each), W future items per group, N candidate items, D item-table width.

A group's user vector ``u_g`` (the ``[USER]`` output, projected to the item table's width) scores item ``i`` by
``s(g, i) = <u_g, e_i> / τ``, where ``e_i`` is row ``i`` of the item table that TorchRec holds. The item rows come
through the ordinary TorchRec lookup (the batch carries the positives and the candidates as sequence features), so
the objective works unchanged when DistributedModelParallel shards the item table.

Each future item ``p`` of group ``g`` (``pos_mask[g, w] = 1``) is one positive, with the loss::

    ℓ(g, p) = -s(g, p) + log( exp s(g, p) + Σ_{c ∈ candidates, c ∉ P_g} exp(s(g, c) - log E[n_c]) )

- ``P_g`` is the set of the group's own future items: a positive is never scored as a negative of its own user.
- **Full softmax** (:attr:`Softmax.FULL`): the candidates are the whole catalogue, each item once, and
  ``log E[n_c] = 0``; this is the exact softmax over every item.
- **Sampled softmax** (:attr:`Softmax.SAMPLED`): the candidates are ``K`` ids drawn uniformly (with replacement;
  the same draw on every rank), plus the positives of the whole global batch (in-batch negatives, gathered from
  every rank). The logQ correction of Yi et al. (RecSys'19) divides each candidate by the number of times it is
  expected in the set, ``E[n_c] = K / N_items + P · f_c`` (``P`` the global number of positives, ``f_c`` the item's
  share of the training positives), so the sum estimates the full softmax's and approaches it as ``K`` grows.

The loss is averaged over every positive of the *global* batch: each rank returns ``Σ_local ℓ · world / P``, the
convention of :class:`supermoe_rec.objectives.task_indicator.TaskIndicatorLoss`, so after gradient averaging over ranks
the update is the
one of the whole batch, however it is split.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather

from supermoe_rec.config.experiment import NextItemsConfig, NextItemsSoftmax

__all__ = ["CandidateSource", "NextItemsLoss", "Softmax", "build_next_items_loss"]


class Softmax(str, enum.Enum):
    """Which items the next-items softmax normalises over."""

    FULL = "full"
    SAMPLED = "sampled"


class NextItemsLoss(nn.Module):
    """Softmax loss of future items against candidate items, with in-batch negatives and logQ correction.

    Args:
        softmax: full (candidates are the catalogue) or sampled (candidates are sampled ids + in-batch positives).
        num_items: N_items, rows of the item table (row 0 is padding and never a candidate).
        num_sampled: K, uniform draws per step (sampled softmax).
        item_frequency: [N_items] share of each item among the training positives (in-batch logQ); ``None`` gives
            uniform in-batch probabilities.
        in_batch_negatives: also use the global batch's positives as candidates (sampled softmax).
        logq_correction: subtract ``log E[n_c]`` from the candidates' scores (sampled softmax).
        temperature: τ.

    Example::

        >>> loss_fn = NextItemsLoss(Softmax.FULL, num_items=5)
        >>> query = torch.tensor([[1.0, 0.0]])                      # one user
        >>> items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
        >>> ids = torch.arange(1, 5)                                # the catalogue: rows 1..4
        >>> out = loss_fn(query, items[[1]][None], torch.tensor([[1]]), torch.ones(1, 1), items[ids], ids)
        >>> round(float(out), 4)  # -1 + log(e^1 + e^0 + e^0 + e^-1)
        0.6265
    """

    def __init__(
        self,
        softmax: Softmax,
        num_items: int,
        num_sampled: int = 0,
        item_frequency: torch.Tensor | None = None,
        in_batch_negatives: bool = True,
        logq_correction: bool = True,
        temperature: float = 1.0,
        global_normalization: bool = True,
    ) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2 (row 0 is padding), got {num_items}")
        if softmax is Softmax.SAMPLED and num_sampled <= 0 and not in_batch_negatives:
            raise ValueError("a sampled softmax needs num_sampled > 0 or in-batch negatives")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.softmax = softmax
        self.num_items = num_items
        self.num_sampled = num_sampled
        self.in_batch_negatives = in_batch_negatives and softmax is Softmax.SAMPLED
        self.logq_correction = logq_correction and softmax is Softmax.SAMPLED
        self.temperature = temperature
        self.global_normalization = global_normalization
        if item_frequency is None:
            item_frequency = torch.full((num_items,), 1.0 / (num_items - 1))
            item_frequency[0] = 0.0
        if item_frequency.shape != (num_items,):
            raise ValueError(f"item_frequency must be [{num_items}], got {list(item_frequency.shape)}")
        self.register_buffer("item_frequency", item_frequency.float(), persistent=False)

    def frequency(self) -> torch.Tensor:
        """[N_items] share of each item among the training positives."""
        freq = self.item_frequency
        assert isinstance(freq, torch.Tensor)
        return freq

    def _group(self) -> dist.ProcessGroup | None:
        if self.global_normalization and dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def forward(
        self,
        query: torch.Tensor,
        pos_emb: torch.Tensor,
        pos_ids: torch.Tensor,
        pos_mask: torch.Tensor,
        cand_emb: torch.Tensor,
        cand_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The next-items loss of this rank's groups.

        Args:
            query: [G, D] user vectors in the item table's width.
            pos_emb: [G, W, D] embeddings of each group's future items (padding rows anything).
            pos_ids: [G, W] their item ids (padding anything).
            pos_mask: [G, W] 1 where the future item exists.
            cand_emb: [N, D] candidate embeddings: the catalogue (full) or the sampled ids (sampled).
            cand_ids: [N] their ids.

        Returns:
            a scalar: ``Σ_local ℓ · world / P_global`` (the global mean when averaged over ranks); 0 when no group
            has a future item.
        """
        group = self._group()
        world = dist.get_world_size(group) if group is not None else 1
        mask = pos_mask != 0  # (G, W)
        local_count = mask.sum()
        with torch.no_grad():
            global_count = local_count.clone()
            if group is not None:
                dist.all_reduce(global_count, group=group)
        dtype = torch.promote_types(query.dtype, torch.float32)
        query = query.to(dtype) / self.temperature
        G, W, D = pos_emb.shape
        if self._is_catalogue(cand_ids) and W == 1 and bool(mask.all()):
            # The full softmax with one positive each: the positive is one of the catalogue's candidates, so the loss
            # is the cross-entropy over the catalogue (the same value and gradient, computed by one fused kernel).
            logits = query @ cand_emb.to(dtype).T  # (G, N): candidate j is item j + 1
            per_positive_sum = F.cross_entropy(logits, pos_ids[:, 0].long() - 1, reduction="sum")
            return per_positive_sum * world / global_count.clamp(min=1).to(dtype)

        if self.in_batch_negatives:
            flat_mask = mask.reshape(G * W)  # (G*W,)
            local_emb = pos_emb.reshape(G * W, D)[flat_mask].to(dtype)  # (P_local, D)
            local_ids = pos_ids.reshape(G * W)[flat_mask]  # (P_local,)
            batch_emb, batch_ids = self._gather_positives(local_emb, local_ids, group)
            cand_emb = torch.cat([cand_emb.to(dtype), batch_emb])  # (N + P, D)
            cand_ids = torch.cat([cand_ids, batch_ids])  # (N + P,)
        if self.logq_correction:
            expected = self.num_sampled / (self.num_items - 1) + float(global_count) * self.frequency()[cand_ids]
            correction = torch.log(expected.to(dtype).clamp(min=1e-12))  # (N',)
        else:
            correction = torch.zeros(len(cand_ids), dtype=dtype, device=query.device)  # (N',)

        pos_scores = torch.einsum("gd,gwd->gw", query, pos_emb.to(dtype))  # (G, W)
        cand_scores = query @ cand_emb.to(dtype).T - correction  # (G, N')
        # A candidate that is one of the group's own future items is not a negative of that group.
        own = (cand_ids[None, None, :] == pos_ids[:, :, None]) & mask[:, :, None]  # (G, W, N')
        negatives = cand_scores.masked_fill(own.any(dim=1), float("-inf"))  # (G, N')
        log_z_neg = torch.logsumexp(negatives, dim=1, keepdim=True)  # (G, 1)
        per_positive = torch.logaddexp(pos_scores, log_z_neg) - pos_scores  # (G, W)
        per_positive = torch.where(mask, per_positive, 0.0)
        return per_positive.sum() * world / global_count.clamp(min=1).to(dtype)

    def _is_catalogue(self, cand_ids: torch.Tensor) -> bool:
        """True when the candidates are the whole catalogue in id order (items 1 .. num_items - 1, once each)."""
        n = self.num_items - 1
        return (
            self.softmax is Softmax.FULL
            and cand_ids.numel() == n
            and int(cand_ids[0]) == 1
            and int(cand_ids[-1]) == n
            and bool((cand_ids[1:] - cand_ids[:-1] == 1).all())
        )

    @staticmethod
    def _gather_positives(
        emb: torch.Tensor, ids: torch.Tensor, group: dist.ProcessGroup | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's positives, in rank order: [P, D] (differentiable) and [P] ids."""
        if group is None:
            return emb, ids
        world = dist.get_world_size(group)
        counts = torch.tensor([len(ids)], dtype=torch.int64)
        all_counts = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        width = int(max(int(c) for c in all_counts))
        # all_gather needs equal shapes: pad to the largest rank's count, then cut each part back.
        padded_emb = torch.cat([emb, emb.new_zeros(width - len(ids), emb.shape[1])])
        padded_ids = torch.cat([ids, ids.new_zeros(width - len(ids))])
        emb_parts = all_gather(padded_emb, group=group)  # type: ignore[no-untyped-call]  # autograd: gradients return to their rank
        id_parts = [torch.zeros_like(padded_ids) for _ in range(world)]
        dist.all_gather(id_parts, padded_ids, group=group)
        n = [int(c) for c in all_counts]
        return (
            torch.cat([part[:k] for part, k in zip(emb_parts, n, strict=True)]),
            torch.cat([part[:k] for part, k in zip(id_parts, n, strict=True)]),
        )


def full_catalogue(num_items: int) -> torch.Tensor:
    """The candidate ids of a full softmax: every row but the padding row 0."""
    return torch.arange(1, num_items, dtype=torch.int64)


def sample_uniform(num_items: int, num_sampled: int, seed: int, step: int) -> torch.Tensor:
    """``num_sampled`` ids drawn uniformly from 1..N-1 with replacement, the same on every rank for a given step."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randint(1, num_items, (num_sampled,), generator=generator)


def resolve_softmax(cfg: NextItemsConfig, num_items: int) -> Softmax:
    """``auto`` -> full up to ``cfg.full_softmax_max_items`` items, sampled above."""
    if cfg.softmax is NextItemsSoftmax.AUTO:
        return Softmax.FULL if num_items - 1 <= cfg.full_softmax_max_items else Softmax.SAMPLED
    return Softmax(cfg.softmax.value)


def build_next_items_loss(
    cfg: NextItemsConfig, num_items: int, item_frequency: torch.Tensor | None = None, world_size: int = 1
) -> NextItemsLoss:
    """The configured loss for an item table of ``num_items`` rows."""
    return NextItemsLoss(
        resolve_softmax(cfg, num_items),
        num_items,
        num_sampled=cfg.num_sampled,
        item_frequency=item_frequency,
        in_batch_negatives=cfg.in_batch_negatives,
        logq_correction=cfg.logq_correction,
        temperature=cfg.temperature,
        global_normalization=world_size > 1,
    )


class CandidateSource:
    """The candidate ids of each batch: the catalogue (full softmax) or a seeded uniform draw (sampled).

    Every rank asks with the same step, so every rank scores the same candidates: the loss then does not depend on
    how the batch is split over ranks.

    Example::

        >>> CandidateSource(Softmax.FULL, num_items=4)(step=7).tolist()
        [1, 2, 3]
        >>> source = CandidateSource(Softmax.SAMPLED, num_items=100, num_sampled=5, seed=1)
        >>> bool((source(3) == source(3)).all()), bool((source(3) == source(4)).all())
        (True, False)
    """

    def __init__(self, softmax: Softmax, num_items: int, num_sampled: int = 0, seed: int = 0) -> None:
        self.softmax = softmax
        self.num_items = num_items
        self.num_sampled = num_sampled
        self.seed = seed
        self._catalogue = full_catalogue(num_items).numpy()

    def __call__(self, step: int) -> npt.NDArray[np.int64]:
        if self.softmax is Softmax.FULL:
            return self._catalogue
        return sample_uniform(self.num_items, self.num_sampled, self.seed, step).numpy()
