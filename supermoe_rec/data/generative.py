"""Generative layout: the samples of a split regrouped so that one causal pass per user scores all of them.

Dimension letters: U users, B rows (samples), G groups (chunks of one user's sequence, one encoder pass each).

In the per-group layout a group is one (user, position): its rows (a positive and its negative) share a history
window, and the encoder runs once per group. In the generative layout a group is a *chunk of a user's whole item
sequence*: the encoder runs once over it (:class:`~supermoe_rec.modules.causal.CausalMoEEncoder`), and every row
of the user whose target position p falls in the chunk is scored from token ``p - start`` (the state after the
items before p). The rows, their candidates and labels are exactly the per-group layout's; only the grouping and
the encoder pass change, so the task-indicator loss and every metric mean what they meant.

Chunks. A user's targets ``[lo, hi)`` (the positions of the split's rows) are cut into chunks of at most
``chunk_length - context`` targets. Chunk c owns the targets ``[a_c, b_c)`` and holds the items ``[s_c, b_c)`` with
``s_c = max(0, a_c - context)``: ``context`` items before its first target, so that with ``context`` at least the
encoder's receptive field (the items a token's output depends on) a chunk gives its owned targets exactly what one
pass over the whole sequence gives (the encoder's prefix property). Every target is owned by exactly one chunk. The
next-items objective reads the same chunk: token k predicts the item at token k + 1, for the owned tokens
``k >= a_c - s_c``.

Checks: each row's per-group history must be the tail of its user's sequence before p (the same window the
per-group layout encodes), else a :class:`~supermoe_rec.data.errors.DataError` names the row.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from supermoe_rec.data.dataset import Jagged, TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.jagged import IntArray, concat_ranges, offsets_from_lengths
from supermoe_rec.data.lists import plain

if TYPE_CHECKING:
    from supermoe_rec.config.experiment import ExperimentConfig
    from supermoe_rec.data.splits import SplitData

log = logging.getLogger(__name__)

__all__ = ["GenerativeReport", "UserSequences", "apply_layout", "plan_chunks", "regroup", "to_generative"]


@dataclass(frozen=True)
class UserSequences:
    """Every user's whole item sequence, oldest first, in the ids of the schema's history feature.

    Attributes:
        users: ``[U]`` user keys (values of the schema's user column), sorted.
        offsets: ``[U + 1]``; user u's items are ``items[offsets[u]:offsets[u + 1]]``.
        items: the flat item ids.

    Example::

        >>> s = UserSequences.from_lists(np.array([7, 3]), [np.array([1, 2]), np.array([5])])
        >>> s.users.tolist(), s.sequence(1).tolist()
        ([3, 7], [1, 2])
    """

    users: npt.NDArray[Any]
    offsets: IntArray
    items: IntArray

    @staticmethod
    def from_lists(users: npt.NDArray[Any], sequences: Sequence[IntArray]) -> UserSequences:
        order = np.argsort(users, kind="stable")
        lengths = np.array([len(sequences[i]) for i in order], dtype=np.int64)
        items = np.concatenate([np.asarray(sequences[i], dtype=np.int64) for i in order]) if len(order) else None
        return UserSequences(
            users=np.asarray(users)[order],
            offsets=offsets_from_lengths(lengths),
            items=items if items is not None else np.zeros(0, dtype=np.int64),
        )

    def sequence(self, u: int) -> IntArray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def index_of(self, keys: npt.NDArray[Any], source: str, input_row: IntArray | None = None) -> IntArray:
        """The index of each user key; a key without a sequence is a :class:`DataError` naming its row
        (``input_row[i]``, the row in the source, when given)."""
        idx = np.searchsorted(self.users, keys).clip(max=max(len(self.users) - 1, 0))
        missing = (self.users[idx] != keys) if len(self.users) else np.ones(len(keys), dtype=bool)
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            row = int(input_row[i]) if input_row is not None else i
            raise DataError(source, f"user {plain(keys[i])!r} has no item sequence", row=row)
        return idx.astype(np.int64)


@dataclass
class GenerativeReport:
    """What regrouping did, for the data report: nothing is dropped."""

    users: int
    chunks: int
    tokens: int
    targets: int
    rows: int
    users_chunked: int
    chunks_without_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def plan_chunks(lo: int, hi: int, chunk_length: int, context: int) -> list[tuple[int, int, int]]:
    """Chunks ``(s, a, b)`` of the targets ``[lo, hi)``: items ``[s, b)``, owned targets ``[a, b)``.

    Example::

        >>> plan_chunks(1, 10, chunk_length=6, context=2)  # at most 4 owned targets per chunk
        [(0, 1, 5), (3, 5, 9), (7, 9, 10)]
    """
    if chunk_length <= context:
        raise ValueError(f"chunk_length={chunk_length} must exceed the context of {context} items")
    step = chunk_length - context
    return [(max(0, a - context), a, min(a + step, hi)) for a in range(lo, hi, step)]


def regroup(
    ds: TabularDataset,
    positions: IntArray,
    sequences: UserSequences,
    history: str,
    chunk_length: int,
    context: int,
) -> tuple[TabularDataset, GenerativeReport]:
    """The generative layout of ``ds``: groups are chunks of users' sequences, rows read their token.

    Args:
        ds: a split in the per-group layout (its per-group ``history`` feature holds each row's window).
        positions: ``[B]`` per stored row of ``ds``, the target position p in its user's sequence (the row's
            history is the items before p).
        sequences: every user's whole sequence.
        history: the name of the per-group history feature.
        chunk_length: the most items one pass holds (plus ``[START]``).
        context: items before a chunk's first target (the encoder's receptive field).

    Returns:
        A new dataset (``ds`` is not changed) with ``position_index`` ``[B]`` and ``target_start`` ``[G]``, and the
        report.
    """
    B = len(ds)
    if positions.shape != (B,):
        raise ValueError(f"positions must have shape [{B}], got {list(positions.shape)}")
    user = sequences.index_of(ds.user_keys, ds.source, ds.input_row)  # (B,)
    seq_len = np.diff(sequences.offsets)[user]  # (B,)
    bad = (positions < 0) | (positions >= seq_len)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            ds.source,
            f"target position {int(positions[row])} lies outside its user's sequence of {int(seq_len[row])} items",
            row=int(ds.input_row[row]),
        )
    _check_windows(ds, positions, user, sequences, history)

    # Chunks per user over the targets of this split, then each row to the chunk that owns its position.
    order = np.lexsort((np.arange(B), positions, user))  # rows by (user, position), stable
    u_sorted, p_sorted = user[order], positions[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    ends = np.r_[starts[1:], B]
    chunk_s: list[int] = []
    chunk_a: list[int] = []
    chunk_b: list[int] = []
    chunk_user: list[int] = []
    row_chunk = np.empty(B, dtype=np.int64)
    users_chunked = 0
    for lo_i, hi_i in zip(starts, ends, strict=True):
        lo, hi = int(p_sorted[lo_i]), int(p_sorted[hi_i - 1]) + 1
        plan = plan_chunks(lo, hi, chunk_length, context)
        users_chunked += len(plan) > 1
        a_bounds = np.array([a for _, a, _ in plan], dtype=np.int64)
        first = len(chunk_s)
        row_chunk[lo_i:hi_i] = first + np.searchsorted(a_bounds, p_sorted[lo_i:hi_i], side="right") - 1
        for s, a, b in plan:
            chunk_s.append(s)
            chunk_a.append(a)
            chunk_b.append(b)
            chunk_user.append(int(u_sorted[lo_i]))
    s_arr, a_arr, b_arr = (np.array(x, dtype=np.int64) for x in (chunk_s, chunk_a, chunk_b))
    # A chunk may own no row (a gap in a user's targets); a group needs a row, so it is left out and counted.
    sizes = np.bincount(row_chunk, minlength=len(s_arr))
    keep = sizes > 0
    remap = np.cumsum(keep) - 1
    row_chunk = remap[row_chunk]
    s_arr, a_arr, b_arr = s_arr[keep], a_arr[keep], b_arr[keep]
    chunk_user_arr = np.array(chunk_user, dtype=np.int64)[keep]
    sizes = sizes[keep]

    out = copy.copy(ds)
    new_rows = order  # already grouped: by user, then position, and chunks are position ranges
    out.input_row = ds.input_row[new_rows]
    out.group_offsets = offsets_from_lengths(sizes.astype(np.int64))
    out.labels = ds.labels[new_rows]
    out.task_mask = ds.task_mask[new_rows]
    out.dense = ds.dense[new_rows]
    out.user_keys = ds.user_keys[new_rows]
    out.user_index = ds.user_index[new_rows]
    out.timestamps = ds.timestamps[new_rows] if ds.timestamps is not None else None
    out.features = {}
    leader = out.group_offsets[:-1]
    for name, jag in ds.features.items():
        starts_ = jag.offsets[new_rows]
        lengths = jag.offsets[new_rows + 1] - starts_
        if name == history:
            # The chunk's items on the group's first row; the other rows carry nothing (as per-group features do).
            lengths = np.zeros(B, dtype=np.int64)
            lengths[leader] = b_arr - s_arr
            values = sequences.items[concat_ranges(sequences.offsets[chunk_user_arr] + s_arr, b_arr - s_arr)]
            out.features[name] = Jagged(values, offsets_from_lengths(lengths))
        else:
            out.features[name] = Jagged(jag.values[concat_ranges(starts_, lengths)], offsets_from_lengths(lengths))
    out.position_index = p_sorted - s_arr[row_chunk]
    out.target_start = a_arr - s_arr
    out.group_lengths = b_arr - s_arr  # items per chunk: the loader batches chunks of similar length
    report = GenerativeReport(
        users=len(starts),
        chunks=len(s_arr),
        tokens=int((1 + b_arr - s_arr).sum()),
        targets=int((b_arr - a_arr).sum()),
        rows=B,
        users_chunked=int(users_chunked),
        chunks_without_rows=int((~keep).sum()),
    )
    if report.chunks_without_rows:
        log.warning("%s: %d chunk(s) own no row and are not encoded", ds.source, report.chunks_without_rows)
    return out, report


def _check_windows(
    ds: TabularDataset, positions: IntArray, user: IntArray, sequences: UserSequences, history: str
) -> None:
    """Each row's per-group history must be the last items of its user's sequence before its position."""
    jag = ds.features[history]
    lengths = np.diff(jag.offsets)
    too_long = lengths > positions
    if too_long.any():
        row = int(np.flatnonzero(too_long)[0])
        raise DataError(
            ds.source,
            f"history of {int(lengths[row])} items is longer than the {int(positions[row])} items before its target",
            row=int(ds.input_row[row]),
            column=history,
        )
    theirs = sequences.items[concat_ranges(sequences.offsets[user] + positions - lengths, lengths)]
    differs = jag.values[concat_ranges(jag.offsets[:-1], lengths)] != theirs
    if differs.any():
        row = int(np.repeat(np.arange(len(ds)), lengths)[np.flatnonzero(differs)[0]])
        raise DataError(
            ds.source,
            "history is not the user's items just before the target position (sequence and samples disagree)",
            row=int(ds.input_row[row]),
            column=history,
        )


def to_generative(data: SplitData, chunk_length: int, context: int) -> SplitData:
    """Every split of ``data`` in the generative layout (:func:`regroup`); the reports go to ``split_info``.

    A source without whole user sequences (a table) is a :class:`~supermoe_rec.config.base.ConfigError`: its
    samples carry windows, not sequences, so train it with ``model.encoder.generative: false``.
    """
    from supermoe_rec.config.base import ConfigError

    if data.sequences is None:
        raise ConfigError(
            f"model.encoder.generative: the source {data.info.get('source')!r} gives samples, not whole user "
            "sequences; set model.encoder.generative=false (the per-group pass) for it"
        )
    history = _history_feature(data)
    splits: dict[str, TabularDataset] = {}
    split_info = {name: dict(info) for name, info in data.split_info.items()}
    for name, ds in data.splits.items():
        splits[name], report = regroup(ds, data.positions[name], data.sequences, history, chunk_length, context)
        split_info.setdefault(name, {})["generative"] = report.as_dict()
    return dataclasses.replace(data, splits=splits, split_info=split_info)


def _history_feature(data: SplitData) -> str:
    names = [s.name for s in data.schema.sequence_features if s.per_group and s.name != data.schema.next_items]
    if len(names) != 1:
        raise ValueError(f"the generative layout needs exactly one per-group history feature, got {names}")
    return names[0]


def apply_layout(data: SplitData, cfg: ExperimentConfig) -> SplitData:
    """``data`` in the layout ``cfg``'s model trains on: generative under ``model.encoder.generative`` (chunks of
    ``data.chunk_length`` items, the encoder's receptive field as context), else unchanged. Idempotent."""
    if not cfg.model.encoder.generative or any(ds.position_index is not None for ds in data.splits.values()):
        return data
    context = cfg.model.encoder.receptive_field(cfg.data.max_history)
    return to_generative(data, cfg.data.chunk_length, context)
