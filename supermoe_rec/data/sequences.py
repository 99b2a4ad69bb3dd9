"""Item-sequence files (one line per user: ``user_id item_1 ... item_n``, oldest first) as next-item samples.

This is the format of the standard sequential-recommendation benchmarks, the Amazon review sequences among them
(``Beauty.txt``, ``Sports_and_Outdoors.txt``: 5-core, chronological, ids from 1, no ratings, timestamps or user
attributes). ``data.source: amazon_beauty | amazon_sports`` reads them from ``data.sequences_dir``;
``data.source: sequences`` reads the file ``data.table``.

The protocol is the usual leave-one-out: each user's last item is the test target, the one before it the valid
target, every earlier position from the second on a train target. A sample at position ``p`` has the up-to
``max_history`` items before ``p`` as its history, and its future items (``data.next_window``) are ``p, p+1, ...``
within its split. Each sample is a group of two rows: the item at ``p`` (``click`` = 1) and an item the user never
interacted with, drawn uniformly (seeded; ``click`` = 0), so the supervised ``click`` task exists for a joint
objective; the next-items objective reads only the future items.

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "seq.txt"
    >>> _ = path.write_text("1 1 2 3 4\\n2 5 6 7\\n")
    >>> users, seqs = read_sequences(path)
    >>> users.tolist(), [s.tolist() for s in seqs]
    ([1, 2], [[1, 2, 3, 4], [5, 6, 7]])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from supermoe_rec.config.experiment import ConfigError, DataConfig
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.generative import UserSequences
from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.schema import Schema

# The public files of the sequential-recommendation benchmarks, by data.source.
SEQUENCE_FILES = {"amazon_beauty": "Beauty.txt", "amazon_sports": "Sports_and_Outdoors.txt"}
SPLITS = ("train", "valid", "test")
# The largest user or item id a sequence file may hold: the item table has max id + 1 rows, and ids index it.
MAX_ID = 2**31 - 1


def sequence_file(cfg: DataConfig) -> Path:
    """The file ``cfg.source`` names; a missing file is a :class:`DataError` naming the expected path."""
    if cfg.source == "sequences":
        if not cfg.table:
            raise ConfigError("data.table: data.source 'sequences' reads the sequence file named by data.table")
        path = Path(cfg.table).expanduser()
    else:
        path = Path(cfg.sequences_dir).expanduser() / SEQUENCE_FILES[cfg.source]
    if not path.is_file():
        raise DataError(
            str(path),
            f"file not found: data.source {cfg.source!r} expects it here (set data.sequences_dir to the folder that "
            "holds it; the Amazon files are those of the public sequential-recommendation benchmarks, docs/data.md)",
        )
    return path


def read_sequences(path: str | Path) -> tuple[IntArray, list[IntArray]]:
    """Users and their item sequences, in file order. A line that is not integers, an id < 1 or above
    :data:`MAX_ID`, a repeated user, a user with fewer than 3 items (train, valid and test need one each) or bytes
    that are not UTF-8 are a :class:`DataError` naming the row (rows count from 0, as in tables: row 0 is the first
    line)."""
    users: list[int] = []
    seqs: list[IntArray] = []
    seen: set[int] = set()
    offset = 0
    with Path(path).open("rb") as f:
        for row, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    str(path), f"not UTF-8 text: byte {raw[exc.start]:#04x} at byte offset {offset + exc.start}", row
                ) from None
            offset += len(raw)
            parts = line.split()
            if not parts:
                continue
            try:
                values = [int(p) for p in parts]
            except ValueError as exc:
                raise DataError(str(path), f"not a line of integer ids ({exc})", row=row) from None
            big = next((v for v in values if v > MAX_ID), None)
            if big is not None:
                raise DataError(str(path), f"id {big} is above the largest id supported, {MAX_ID} (2^31 - 1)", row)
            ids = np.array(values, dtype=np.int64)
            if (ids < 1).any():
                raise DataError(str(path), f"ids start at 1, got {int(ids.min())}", row=row)
            if len(ids) < 4:
                raise DataError(str(path), "a user needs at least 3 items (train, valid, test)", row=row)
            if int(ids[0]) in seen:
                raise DataError(str(path), f"user {int(ids[0])} appears twice", row=row)
            seen.add(int(ids[0]))
            users.append(int(ids[0]))
            seqs.append(ids[1:])
    if not users:
        raise DataError(str(path), "no sequences (empty file)")
    return np.array(users, dtype=np.int64), seqs


def _negatives(
    seqs: list[IntArray], user_of: IntArray, num_items: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """One item per sample that its user never interacted with, uniform over the others (rejection sampling)."""
    keys = np.unique(np.concatenate([u * (num_items + 1) + s for u, s in enumerate(seqs)]))
    out = rng.integers(1, num_items + 1, size=len(user_of))
    for _ in range(100):
        clash = np.isin(user_of * (num_items + 1) + out, keys)
        if not clash.any():
            return out
        out[clash] = rng.integers(1, num_items + 1, size=int(clash.sum()))
    raise DataError("sequences", "could not draw negatives: a user interacted with almost every item")


def build_sequences(users: IntArray, seqs: list[IntArray], cfg: DataConfig, name: str) -> dict[str, object]:
    """Leave-one-out next-item samples per split: ``{"frames", "schema", "split_counts"}``."""
    num_items = int(max(int(s.max()) for s in seqs))
    rng = np.random.default_rng(cfg.seed)
    frames: dict[str, pd.DataFrame] = {}
    counts: dict[str, dict[str, int]] = {}
    for split_id, split in enumerate(SPLITS):
        user_of, position = [], []
        for u, s in enumerate(seqs):
            n = len(s)
            ps = np.arange(1, n - 2) if split_id == 0 else np.array([n - 3 + split_id])
            user_of.append(np.full(len(ps), u, dtype=np.int64))
            position.append(ps)
        u_idx, pos = np.concatenate(user_of), np.concatenate(position)
        end = np.array([len(seqs[u]) - 2 + split_id for u in u_idx], dtype=np.int64)  # one past the split's last item
        positives = np.array([seqs[u][p] for u, p in zip(u_idx, pos, strict=True)], dtype=np.int64)
        negatives = _negatives(seqs, u_idx, num_items, rng)
        history = np.empty(len(u_idx), dtype=object)
        history[:] = [seqs[u][max(0, p - cfg.max_history) : p] for u, p in zip(u_idx, pos, strict=True)]
        group = np.repeat(np.arange(len(u_idx)), 2)
        frame = {
            "user_id": users[u_idx][group],
            "group_id": group,
            "position": pos[group],
            "item": np.stack([positives, negatives], axis=1).reshape(-1),
            "click": np.tile([1.0, 0.0], len(u_idx)),
            "history": history[group],
        }
        if cfg.next_window:
            future = np.empty(len(u_idx), dtype=object)
            future[:] = [seqs[u][p : min(p + cfg.next_window, e)] for u, p, e in zip(u_idx, pos, end, strict=True)]
            frame["next_items"] = future[group]
        frames[split] = pd.DataFrame(frame)
        counts[split] = {"positives": len(u_idx), "negatives": len(u_idx)}
    sequence_features: list[dict[str, object]] = [
        {"name": "history", "column": "history", "table": "item", "multi_valued": True, "per_group": True},
        {"name": "target_item", "column": "item", "table": "item"},
    ]
    if cfg.next_window:
        sequence_features.append(
            {"name": "next_items", "column": "next_items", "table": "item", "multi_valued": True, "per_group": True}
        )
    schema = Schema.from_dict(
        {
            "name": name,
            "user_column": "user_id",
            "group_column": "group_id",
            "tables": [{"name": "item", "num_embeddings": num_items + 1}],
            "sequence_features": sequence_features,
            "tasks": [{"name": "click", "type": "binary", "label": "click"}],
            **({"next_items": "next_items"} if cfg.next_window else {}),
        },
        source=f"{name} protocol",
    )
    sequences = UserSequences.from_lists(users, seqs)
    return {"frames": frames, "schema": schema, "split_counts": counts, "num_items": num_items, "sequences": sequences}
