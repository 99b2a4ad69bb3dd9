"""SparseArch: TorchRec embedding collections for the pooled and the sequence features of a schema.

Dimension letters: B rows, N_f ids of sequence feature f in the batch, L_f its padded length, D embedding dim,
F features.

- Pooled features (user profile, multi-hot genres, ...) go through one :class:`EmbeddingBagCollection`.
- Sequence features (the history, and the target item as a sequence of length 1 sharing the item table) go
  through either an unpooled :class:`EmbeddingCollection`, or an EmbeddingBagCollection in which every id is a bag
  of length 1 ("bags of one", :func:`bags_of_one`). Either way the output stays jagged (:class:`SparseOutput`):
  consumers pad only the rows they read. On CPU the EC's backward was measured at ~7x the cost of bags
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
from supermoe_rec.data.batch import Batch, bags_of_one
from supermoe_rec.data.schema import ITEM_CANDIDATES, FeatureSpec, Schema
from supermoe_rec.modules.padding import pad_rows

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
    """Embeddings of one batch. Sequence features stay jagged: a consumer pads only the rows it reads.

    Attributes:
        pooled: feature -> [B, D] pooled embedding.
        values: feature -> [N_f, D], the embedding of each of the feature's ids, in the KJT's (row, position)
            order; N_f = ``lengths[f].sum()``.
        lengths: feature -> [B] int64 sequence lengths.
    """

    pooled: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]

    def padded(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feature ``name`` padded to ``[Q, L, D]`` for ``rows`` (all B rows when None), zeros at padding.

        L is the longest of the chosen rows, so padding the few rows that carry a long per-group history (the
        group leaders) costs O(G L D), not O(B L D).
        """
        values, lengths = self.values[name], self.lengths[name]
        return pad_rows(values, lengths, rows)

    @property
    def sequences(self) -> dict[str, torch.Tensor]:
        """Every sequence feature padded over all rows: feature -> [B, L_f, D] (small batches, tests)."""
        return {name: self.padded(name) for name in self.values}


def _tables_by_feature(features: tuple[FeatureSpec, ...]) -> dict[str, list[FeatureSpec]]:
    by_table: dict[str, list[FeatureSpec]] = {}
    for f in features:
        by_table.setdefault(f.table, []).append(f)
    return by_table


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

    def bag_input(self, batch: Batch) -> KeyedJaggedTensor | None:
        """The batch's bags of one (:attr:`~supermoe_rec.data.batch.Batch.sequence_bags`) when the sequence features
        go through the bags-of-one table, else None: an EmbeddingCollection reads the jagged features themselves, so
        the bags are not built for it."""
        return batch.sequence_bags if self.sequence_ebc is not None else None

    def forward(
        self,
        sparse_features: KeyedJaggedTensor,
        sequence_features: KeyedJaggedTensor,
        sequence_bags: KeyedJaggedTensor | None = None,
    ) -> SparseOutput:
        """Look up every feature.

        The body only calls the embedding collections on the batch's KJTs and hands their outputs to plain
        functions: TorchRec's TrainPipelineSparseDist traces it with torch.fx to pipeline the sharded lookups.
        ``sequence_bags`` is ``sequence_features`` as bags of one (:attr:`supermoe_rec.data.batch.Batch.sequence_bags`):
        given straight from the batch, the pipeline distributes the sequence table's input one batch ahead; when
        None, it is built here (and that lookup is not pipelined).

        Returns:
            :class:`SparseOutput` with pooled [B, D] and padded sequence [B, L_f, D] embeddings.
        """
        pooled = self.ebc(sparse_features) if self.ebc is not None else None
        if self.sequence_ec is not None:
            unpooled = self.sequence_ec(sequence_features)
            return sparse_output_from_ec(pooled, unpooled, sequence_features, self.grad_scale)
        if self.sequence_ebc is not None:
            bag_input = sequence_bags if sequence_bags is not None else bags_of_one_kjt(sequence_features)
            bags = self.sequence_ebc(bag_input)
            return sparse_output_from_bags(pooled, bags, sequence_features, self.grad_scale)
        return sparse_output_from_ec(pooled, {}, sequence_features, self.grad_scale)


def _finish(
    pooled: KeyedTensor | None,
    values: dict[str, torch.Tensor],
    sequence_features: KeyedJaggedTensor,
    grad_scale: float,
) -> SparseOutput:
    pooled_dict: dict[str, torch.Tensor] = pooled.to_dict() if pooled is not None else {}
    # TorchRec's default gradient division already averages table gradients over ranks (see SparseArch.grad_scale).
    if grad_scale != 1.0 and not get_gradient_division():
        pooled_dict = {k: scale_grad(v, grad_scale) for k, v in pooled_dict.items()}
        values = {k: scale_grad(v, grad_scale) for k, v in values.items()}
    lengths = {name: jt.lengths().long() for name, jt in sequence_features.to_dict().items()}
    return SparseOutput(pooled=pooled_dict, values=values, lengths=lengths)


def sparse_output_from_ec(
    pooled: KeyedTensor | None,
    unpooled: dict[str, JaggedTensor],
    sequence_features: KeyedJaggedTensor,
    grad_scale: float,
) -> SparseOutput:
    """The EmbeddingCollection's jagged outputs: each feature's values [N_f, D]."""
    return _finish(pooled, {name: jt.values() for name, jt in unpooled.items()}, sequence_features, grad_scale)


def bags_of_one_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """:func:`bags_of_one` as one graph node for torch.fx (TorchRec's pipeline tracer)."""
    return bags_of_one(kjt)


def sparse_output_from_bags(
    pooled: KeyedTensor | None, bags: KeyedTensor, sequence_features: KeyedJaggedTensor, grad_scale: float
) -> SparseOutput:
    """Cut the compact bags-of-one EBC output ([n, D] per key) back to each feature's values [N_f, D]."""
    flat = bags.to_dict()
    counts = sequence_features.lengths().view(len(sequence_features.keys()), -1).long().sum(dim=1).tolist()
    values = {name: flat[name][: int(n)] for name, n in zip(sequence_features.keys(), counts, strict=True)}
    return _finish(pooled, values, sequence_features, grad_scale)


# Leaf functions for torch.fx (TorchRec's pipeline tracer): called with proxies, run eagerly at execution time.
torch.fx.wrap("sparse_output_from_ec")
torch.fx.wrap("sparse_output_from_bags")
torch.fx.wrap("bags_of_one_kjt")
