"""SparseArch: TorchRec embedding collections for the pooled and the sequence features of a schema.

Dimension letters: B rows, L_f padded length of sequence feature f, S = Σ_f L_f, D embedding dim, F features.

- Pooled features (user profile, multi-hot genres, ...) go through one :class:`EmbeddingBagCollection`.
- Sequence features (the history, and the target item as a sequence of length 1 sharing the item table) go
  through either an unpooled :class:`EmbeddingCollection`, or an EmbeddingBagCollection in which every sequence
  position is a bag of length 1 ("bags of one"). On CPU the EC's backward was measured at ~7x the cost of bags
  of one (docs/design.md#embedding-lookup-speed-on-cpu), so ``SequenceLookup.AUTO`` picks bags of one on CPU and
  the EC elsewhere.

Both are plain TorchRec modules, so DistributedModelParallel shards them without changes, and the whole arch can
be built on ``meta``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from supermoe_rec.config.experiment import SequenceLookup
from supermoe_rec.data.schema import ITEM_CANDIDATES, FeatureSpec, Schema

# N(0, 0.02) learned far faster than N(0, 1) or TorchRec's uniform(±1/sqrt(rows)) on ml100k-mt
# (docs/design.md#lessons-from-the-first-prototype).
EMBEDDING_INIT_STD = 0.02


def resolve_sequence_lookup(lookup: SequenceLookup, device: torch.device | None) -> SequenceLookup:
    """``AUTO`` -> bags of one on CPU (measured faster there), the EmbeddingCollection on accelerators."""
    if lookup is not SequenceLookup.AUTO:
        return lookup
    device_type = (device or torch.device("cpu")).type
    return SequenceLookup.BAGS_OF_ONE if device_type in ("cpu", "meta") else SequenceLookup.EMBEDDING_COLLECTION


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale``."""
    out: torch.Tensor = _ScaleGrad.apply(x, scale)  # type: ignore[no-untyped-call]
    return out


@dataclass
class SparseOutput:
    """Embeddings of one batch.

    Attributes:
        pooled: feature -> [B, D] pooled embedding.
        sequences: feature -> [B, L_f, D], left-aligned, zeros at padding.
        lengths: feature -> [B] int64 sequence lengths.
    """

    pooled: dict[str, torch.Tensor]
    sequences: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]


def _tables_by_feature(features: tuple[FeatureSpec, ...]) -> dict[str, list[FeatureSpec]]:
    by_table: dict[str, list[FeatureSpec]] = {}
    for f in features:
        by_table.setdefault(f.table, []).append(f)
    return by_table


def bags_of_one(kjt: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, list[int]]:
    """Re-express jagged sequences as bags of length 0/1, one bag per (row, position): stride B * S.

    Key f owns positions [off_f, off_f + L_f) of every row; its bags there have length 1 up to the row's length
    and 0 after (zeros after pooling). Values are untouched: their order is already (key, row, position).

    Returns:
        the new KJT and the per-key padded lengths L_f.

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["h"], torch.tensor([5, 6, 7]), torch.tensor([2, 1]))
        >>> out, max_lengths = bags_of_one(kjt)
        >>> out.lengths().tolist(), out.stride(), max_lengths
        ([1, 1, 1, 0], 4, [2])
    """
    keys = kjt.keys()
    batch = kjt.stride()
    lengths = kjt.lengths().view(len(keys), batch).long()  # (F, B)
    max_lengths = lengths.max(dim=1).values.tolist() if batch else [0] * len(keys)
    total = int(sum(max_lengths))
    new_lengths = torch.zeros(len(keys), batch, total, dtype=torch.int32, device=lengths.device)  # (F, B, S)
    offset = 0
    for f, width in enumerate(max_lengths):
        positions = torch.arange(width, device=lengths.device)
        new_lengths[f, :, offset : offset + width] = (positions[None, :] < lengths[f, :, None]).to(torch.int32)
        offset += width
    out = KeyedJaggedTensor(
        keys=keys,
        values=kjt.values(),
        lengths=new_lengths.view(-1),
        stride=batch * total,  # (F*B*S,)
    )
    return out, [int(w) for w in max_lengths]


class SparseArch(nn.Module):
    """All embedding tables of a schema: pooled features through an EBC, sequence features through an EC or bags of one.

    Tables are created once per schema table, so features naming the same table share it (the history and the
    target item share the item table). Table rows are initialised N(0, 0.02).

    Args:
        schema: the data schema (tables, pooled and sequence features).
        embedding_dim: D, the width of every table that does not set its own.
        sequence_lookup: how sequence features are looked up (resolved with the device when AUTO).
        device: where the tables live; ``meta`` for sharding with DistributedModelParallel.

    Example::

        >>> schema = Schema.from_dict({"user_column": "u", "group_column": "g",
        ...     "tables": [{"name": "user", "num_embeddings": 10}, {"name": "item", "num_embeddings": 20}],
        ...     "sparse_features": [{"name": "user", "column": "u", "table": "user", "side": "user"}],
        ...     "sequence_features": [
        ...         {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
        ...         {"name": "target_item", "column": "i", "table": "item"}],
        ...     "tasks": [{"name": "y", "type": "binary", "label": "y"}]})
        >>> arch = SparseArch(schema, embedding_dim=4)
        >>> sparse = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> seq = KeyedJaggedTensor.from_lengths_sync(
        ...     ["history", "target_item"], torch.tensor([3, 4, 5, 6, 7]), torch.tensor([3, 0, 1, 1]))
        >>> out = arch(sparse, seq)
        >>> out.pooled["user"].shape, out.sequences["history"].shape, out.lengths["history"].tolist()
        (torch.Size([2, 4]), torch.Size([2, 3, 4]), [3, 0])
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int,
        sequence_lookup: SequenceLookup = SequenceLookup.AUTO,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.sequence_lookup = resolve_sequence_lookup(sequence_lookup, device)
        self.pooled_features = [f.name for f in schema.sparse_features]
        sequence_specs = list(schema.sequence_features)
        candidate_table = schema.next_items_table()
        if candidate_table is not None:
            # The next-items candidates ride in the sequence KJT and read the item table, like the history.
            sequence_specs.append(FeatureSpec(ITEM_CANDIDATES, ITEM_CANDIDATES, candidate_table.name))
        self.sequence_features = [f.name for f in sequence_specs]
        # Gradient factor for the embedding outputs, meant to turn a *sum* of row gradients over ranks into a mean
        # (each rank's loss is world_size x its share of the global loss, see TaskIndicatorLoss). It is applied
        # only when TorchRec's gradient division is off: by default (comm_ops.GRADIENT_DIVISION) the backward of
        # the sharded lookups' all-to-all already divides by world_size, as DDP does for data-parallel tables, so
        # every table already receives the gradient of the global loss and a further 1 / world_size would halve it
        # (tests/distributed/test_dmp_equivalence.py). With the division off, data-parallel tables (averaged by DDP)
        # would need 1.0 while sharded ones need 1 / world_size: a per-table factor, not supported here.
        self.grad_scale = 1.0
        init = functools.partial(nn.init.normal_, mean=0.0, std=EMBEDDING_INIT_STD)

        def table_args(table: str, feats: list[FeatureSpec]) -> dict[str, Any]:
            """What every table config shares: name, width, rows, the features reading it, and the init."""
            spec = schema.table(table)
            return {
                "name": table,
                "embedding_dim": spec.embedding_dim or embedding_dim,
                "num_embeddings": spec.num_embeddings,
                "feature_names": [f.name for f in feats],
                "init_fn": init,
            }

        pooled_tables = [
            # Multi-hot features average their ids, so a long list does not outweigh a single id.
            EmbeddingBagConfig(
                **table_args(table, feats),
                pooling=PoolingType.MEAN if any(f.multi_valued for f in feats) else PoolingType.SUM,
            )
            for table, feats in _tables_by_feature(schema.sparse_features).items()
        ]
        self.ebc: EmbeddingBagCollection | None = (
            EmbeddingBagCollection(tables=pooled_tables, device=device) if pooled_tables else None
        )
        sequence_groups = _tables_by_feature(tuple(sequence_specs)).items()
        self.sequence_ec: EmbeddingCollection | None = None
        self.sequence_ebc: EmbeddingBagCollection | None = None
        if self.sequence_lookup is SequenceLookup.EMBEDDING_COLLECTION and sequence_groups:
            self.sequence_ec = EmbeddingCollection(
                tables=[EmbeddingConfig(**table_args(table, feats)) for table, feats in sequence_groups],
                device=device,
            )
        elif sequence_groups:
            # Every bag holds one id (or none, at padding), so SUM pooling returns the id's row (or zeros).
            self.sequence_ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(**table_args(table, feats), pooling=PoolingType.SUM)
                    for table, feats in sequence_groups
                ],
                device=device,
            )

    def forward(self, sparse_features: KeyedJaggedTensor, sequence_features: KeyedJaggedTensor) -> SparseOutput:
        """Look up every feature.

        The body only calls the embedding collections on the batch's KJTs and hands their outputs to plain
        functions: TorchRec's TrainPipelineSparseDist traces it with torch.fx to pipeline the sharded lookups.

        Returns:
            :class:`SparseOutput` with pooled [B, D] and padded sequence [B, L_f, D] embeddings.
        """
        pooled = self.ebc(sparse_features) if self.ebc is not None else None
        if self.sequence_ec is not None:
            unpooled = self.sequence_ec(sequence_features)
            return sparse_output_from_ec(pooled, unpooled, sequence_features, self.grad_scale)
        if self.sequence_ebc is not None:
            bags = self.sequence_ebc(bags_of_one_kjt(sequence_features))
            return sparse_output_from_bags(pooled, bags, sequence_features, self.grad_scale)
        return sparse_output_from_ec(pooled, {}, sequence_features, self.grad_scale)


def _finish(
    pooled: KeyedTensor | None,
    sequences: dict[str, torch.Tensor],
    lengths: dict[str, torch.Tensor],
    grad_scale: float,
) -> SparseOutput:
    pooled_dict: dict[str, torch.Tensor] = pooled.to_dict() if pooled is not None else {}
    # TorchRec's default gradient division already averages table gradients over ranks (see SparseArch.grad_scale).
    if grad_scale != 1.0 and not get_gradient_division():
        pooled_dict = {k: scale_grad(v, grad_scale) for k, v in pooled_dict.items()}
        sequences = {k: scale_grad(v, grad_scale) for k, v in sequences.items()}
    return SparseOutput(pooled=pooled_dict, sequences=sequences, lengths=lengths)


def sparse_output_from_ec(
    pooled: KeyedTensor | None,
    unpooled: dict[str, JaggedTensor],
    sequence_features: KeyedJaggedTensor,
    grad_scale: float,
) -> SparseOutput:
    """Pad the EmbeddingCollection's jagged outputs to [B, L_f, D]."""
    lengths = {name: jt.lengths().long() for name, jt in sequence_features.to_dict().items()}
    sequences = {}
    for name, jt in unpooled.items():
        width = int(lengths[name].max().item()) if lengths[name].numel() else 0
        sequences[name] = jt.to_padded_dense(desired_length=width, padding_value=0.0)  # (B, L_f, D)
    return _finish(pooled, sequences, lengths, grad_scale)


def bags_of_one_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """:func:`bags_of_one` without the widths (a single output keeps it traceable as one graph node)."""
    return bags_of_one(kjt)[0]


def sparse_output_from_bags(
    pooled: KeyedTensor | None, bags: KeyedTensor, sequence_features: KeyedJaggedTensor, grad_scale: float
) -> SparseOutput:
    """Cut the bags-of-one EBC output [B * S, D] per key back into [B, L_f, D]."""
    lengths = {name: jt.lengths().long() for name, jt in sequence_features.to_dict().items()}
    batch = sequence_features.stride()
    widths = [int(lengths[k].max().item()) if batch else 0 for k in sequence_features.keys()]  # noqa: SIM118 (a KJT, not a dict)
    total = sum(widths)
    flat = bags.to_dict()
    sequences = {}
    offset = 0
    for name, width in zip(sequence_features.keys(), widths, strict=True):
        per_row = flat[name].view(batch, total, -1)  # (B, S, D)
        sequences[name] = per_row[:, offset : offset + width]  # (B, L_f, D)
        offset += width
    return _finish(pooled, sequences, lengths, grad_scale)


# Leaf functions for torch.fx (TorchRec's pipeline tracer): called with proxies, run eagerly at execution time.
torch.fx.wrap("sparse_output_from_ec")
torch.fx.wrap("sparse_output_from_bags")
torch.fx.wrap("bags_of_one_kjt")
