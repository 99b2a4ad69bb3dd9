"""The model input: a :class:`Batch` of TorchRec KeyedJaggedTensors plus dense features, labels and task masks.

Dimension letters: B rows (candidates), G groups (distinct users/histories in the batch), T tasks, F dense features.

Rows of a group are contiguous and share the user side: ``group_index`` [B] maps each row to its group (0..G-1),
and per-group sequence features (the history) are carried on the group's first row only (length 0 elsewhere), so
the history is looked up and encoded once per group, and every candidate of the group is scored from that pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


def bags_of_one(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Re-express jagged sequences as bags of one id each, compactly: stride ``n = max_f N_f``.

    Key f's N_f ids become its first N_f bags (length 1); its other ``n - N_f`` bags are empty (zeros after
    pooling). Values are untouched. The cost is O(F n), whatever the padded width of the sequences: a batch whose
    only long sequences are a few group histories pays for their ids, not for B x their length.

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["h", "t"], torch.tensor([5, 6, 7, 8]),
        ...                                           torch.tensor([3, 0, 1, 0]))
        >>> out = bags_of_one(kjt)
        >>> out.lengths().tolist(), out.stride()
        ([1, 1, 1, 1, 0, 0], 3)
    """
    keys = kjt.keys()
    batch = kjt.stride()
    counts = kjt.lengths().view(len(keys), batch).long().sum(dim=1)  # (F,) N_f
    n = max(int(counts.max()) if len(keys) else 0, 1)  # a KJT needs a stride >= 1
    lengths = (torch.arange(n, device=counts.device)[None, :] < counts[:, None]).to(torch.int32)  # (F, n)
    return KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=lengths.view(-1), stride=n)


@dataclass
class Batch(Pipelineable):
    """One batch, movable by TorchRec's TrainPipelineSparseDist (``to``, ``pin_memory``, ``record_stream``).

    Attributes:
        sparse_features: pooled categorical features (EmbeddingBagCollection input), stride B.
        sequence_features: unpooled sequence features (EmbeddingCollection input), stride B. Per-group keys
            (the history) have length 0 on every row but the first of its group.
        dense_features: [B, F] float32 (F may be 0).
        labels: [B, T] float32; 0 where the task mask is 0.
        task_mask: [B, T] float32 in {0, 1}: 1 where row i carries a label for task t.
        group_index: [B] int64, the group of each row; non-decreasing, so groups are contiguous.
        user_index: [B] int64 user codes (per-user metrics such as GAUC).
        position_index: [B] int64 or None. The generative layout (:mod:`supermoe_rec.data.generative`): a group's
            history is a chunk of its user's whole sequence, and row i is scored from token ``position_index[i]``
            of its group's causal pass (the state after that many of the chunk's items). None: the per-group
            layout, every row reads the state after its group's whole history.
        target_start: [G] int64 or None, generative layout only: the first token of each group whose next item is
            a next-items target (earlier tokens are context shared with the previous chunk).

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> b = Batch(kjt, kjt, torch.zeros(2, 0), torch.ones(2, 1), torch.ones(2, 1),
        ...           torch.tensor([0, 0]), torch.tensor([7, 7]))
        >>> b.batch_size, b.num_groups
        (2, 1)
    """

    sparse_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    task_mask: torch.Tensor
    group_index: torch.Tensor
    user_index: torch.Tensor
    position_index: torch.Tensor | None = None
    target_start: torch.Tensor | None = None

    @functools.cached_property
    def sequence_bags(self) -> KeyedJaggedTensor:
        """``sequence_features`` as bags of one id each (:func:`bags_of_one`), the input of the bags-of-one sequence
        table. A batch field in the eyes of TorchRec's pipeline, so that table's input is distributed one batch
        ahead like every other sharded lookup's."""
        return bags_of_one(self.sequence_features)

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_index[-1].item()) + 1 if self.group_index.numel() else 0

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            sequence_features=self.sequence_features.to(device=device, non_blocking=non_blocking),
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            task_mask=self.task_mask.to(device=device, non_blocking=non_blocking),
            group_index=self.group_index.to(device=device, non_blocking=non_blocking),
            user_index=self.user_index.to(device=device, non_blocking=non_blocking),
            position_index=_maybe(self.position_index, lambda x: x.to(device=device, non_blocking=non_blocking)),
            target_start=_maybe(self.target_start, lambda x: x.to(device=device, non_blocking=non_blocking)),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.sequence_features.record_stream(stream)
        for t in (self.dense_features, self.labels, self.task_mask, self.group_index, self.user_index):
            t.record_stream(stream)  # type: ignore[arg-type]
        for opt in (self.position_index, self.target_start):
            if opt is not None:
                opt.record_stream(stream)  # type: ignore[arg-type]
        if "sequence_bags" in self.__dict__:  # built on this device already (a cached property)
            self.sequence_bags.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            sequence_features=self.sequence_features.pin_memory(),
            dense_features=self.dense_features.pin_memory(),
            labels=self.labels.pin_memory(),
            task_mask=self.task_mask.pin_memory(),
            group_index=self.group_index.pin_memory(),
            user_index=self.user_index.pin_memory(),
            position_index=_maybe(self.position_index, torch.Tensor.pin_memory),
            target_start=_maybe(self.target_start, torch.Tensor.pin_memory),
        )


def _maybe(x: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    return None if x is None else fn(x)
