"""How a schema's features feed a model: user profile, candidate item, and history, from one SparseArch output.

Dimension letters: B rows (candidates), G groups (user-side passes), L history length, D embedding dim,
P profile features, I item-side features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from supermoe_rec.data.schema import FeatureSide, Schema

if TYPE_CHECKING:  # annotations only: the over-arch imports without TorchRec (supermoe_rec.serving relies on it)
    from supermoe_rec.modules.embeddings import SparseOutput


@dataclass(frozen=True)
class FeatureLayout:
    """Which features play which role.

    - ``profile``: pooled user-side features (concatenated).
    - ``item``: pooled item-side features plus per-row sequence features such as the target item (sum-pooled over
      their length, so a length-1 target is its own embedding); concatenated.
    - ``history``: per-group sequence features, summed position by position (they must share lengths).
    """

    profile: tuple[str, ...]
    item: tuple[str, ...]
    history: tuple[str, ...]
    num_dense: int
    # The per-group feature with each sample's future items (next-items objective), if the schema has one.
    next_items: str | None = None

    @staticmethod
    def from_schema(schema: Schema) -> FeatureLayout:
        profile = tuple(f.name for f in schema.sparse_features if f.side is FeatureSide.USER)
        item = tuple(f.name for f in schema.sparse_features if f.side is FeatureSide.ITEM)
        item += tuple(f.name for f in schema.sequence_features if not f.per_group)
        # The next-items feature holds the sample's future: a label for the next-items loss, never an input.
        history = tuple(f.name for f in schema.sequence_features if f.per_group and f.name != schema.next_items)
        return FeatureLayout(
            profile=profile,
            item=item,
            history=history,
            num_dense=len(schema.dense_features),
            next_items=schema.next_items,
        )


def leader_rows(group_index: torch.Tensor) -> torch.Tensor:
    """Row of each group's first candidate: [G] int64 (groups are contiguous, in order).

    Example::

        >>> leader_rows(torch.tensor([0, 0, 1, 2, 2])).tolist()
        [0, 2, 3]
    """
    first = torch.ones_like(group_index, dtype=torch.bool)
    first[1:] = group_index[1:] != group_index[:-1]
    return first.nonzero().squeeze(1)


def concat_pooled(out: SparseOutput, names: tuple[str, ...], batch: int, like: torch.Tensor) -> torch.Tensor:
    """[B, Σ D_f] concatenation of pooled (or sum-pooled sequence) features; [B, 0] when there are none."""
    parts = [out.pooled[n] if n in out.pooled else out.padded(n).sum(dim=1) for n in names]
    if not parts:
        return like.new_zeros(batch, 0)
    return torch.cat(parts, dim=1)


def history_of(
    out: SparseOutput, names: tuple[str, ...], rows: torch.Tensor, embedding_dim: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded history [G, L, D] and lengths [G] at the given (leader) rows; L = 0 when there is no history.

    Non-leader rows carry no history (length 0), so the batch-wide padded width is already the leaders' maximum.
    """
    if not names:
        return like.new_zeros(len(rows), 0, embedding_dim), rows.new_zeros(len(rows))
    history = out.padded(names[0], rows)  # (G, L, D)
    for name in names[1:]:
        history = history + out.padded(name, rows)
    return history, out.lengths[names[0]][rows]
