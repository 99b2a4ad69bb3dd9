"""Fresh vectors from new events (``supermoe-rec embed``) and top-k retrieval with them (``supermoe-rec retrieve``).

Dimension letters: U users (queries), N items, M vector width, k results per user.

- :func:`embed`: events parquet/CSV -> ``vectors.parquet`` with the schema's user column, ``user`` (the [USER]
  vector, list<float> of length M), one ``task_<name>`` column per task, ``history_length`` and ``seen_items``
  (the raw candidate ids of the user's history, which ``retrieve`` excludes).
- :func:`topk_exact`: inner products in blocks of users, ranked by :func:`supermoe_rec.objectives.ranking.top_k`
  (the one rank convention: rank 1 = best, ties: the smaller item row first); excluded items are never returned.
- :class:`FaissIndex`: ``faiss-cpu`` inverted-file index (``IndexIVFFlat``, inner product): approximate, it asks for
  k + (most excluded items of any user) candidates and drops the excluded ones.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from supermoe_rec.config.experiment import ConfigError
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.features import read_table
from supermoe_rec.data.output import atomic_output, check_output
from supermoe_rec.objectives.ranking import top_k
from supermoe_rec.serving.artifact import artifact_id
from supermoe_rec.serving.encoder import Encoded, UserEncoder

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

INDEXES = ("exact", "faiss")
# The vectors parquet's metadata key holding the id (manifest SHA-256) of the artifact that made them.
ARTIFACT_ID_KEY = "supermoe_rec.artifact_sha256"


def check_vectors_source(encoder: UserEncoder, path: str | Path) -> None:
    """Refuse vectors that another artifact made (their parquet metadata names it): scoring them against this
    artifact's items would rank meaningless items. Vectors without that metadata (not from ``embed``) pass."""
    path = Path(path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return  # not parquet: read_vectors names what is wrong with it
    made_by = meta.get(ARTIFACT_ID_KEY.encode())
    if made_by is not None:
        mine = artifact_id(encoder.directory)
        if made_by.decode() != mine:
            other = meta.get(b"supermoe_rec.artifact", b"?").decode()
            raise DataError(
                str(path),
                f"these vectors were made by another artifact ({other}, manifest sha256 {made_by.decode()[:12]}), "
                f"not by {encoder.directory} (sha256 {mine[:12]}); embed the events with this artifact first",
            )
        return
    source = meta.get(b"supermoe_rec.source")
    if source is not None and source.decode() != json.dumps(encoder.manifest["source"]):
        raise DataError(
            str(path),
            f"these vectors were made from another run or checkpoint ({source.decode()}), not the one of "
            f"{encoder.directory}; embed the events with this artifact first",
        )


def _as_list_column(matrix: FloatArray) -> pa.ListArray:
    U, M = matrix.shape
    offsets = pa.array(np.arange(0, (U + 1) * M, M, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1).astype(np.float32)))


# ------------------------------------------------------------------------------------------------- embed


def vectors_table(encoder: UserEncoder, encoded: Encoded, seen: Sequence[Sequence[Any]]) -> pa.Table:
    """The ``vectors.parquet`` table of :func:`embed`."""
    columns: dict[str, Any] = {
        encoder.schema.user_column: pa.array(encoded.user_keys),
        "user": _as_list_column(encoded.user),
    }
    for name, matrix in encoded.tasks.items():
        columns[f"task_{name}"] = _as_list_column(matrix)
    columns["history_length"] = pa.array(encoded.history_lengths)
    columns["seen_items"] = pa.array([list(s) for s in seen])
    meta = {
        "supermoe_rec.artifact": str(encoder.directory),
        ARTIFACT_ID_KEY: artifact_id(encoder.directory),
        "supermoe_rec.source": json.dumps(encoder.manifest["source"]),
        "supermoe_rec.unknown_ids": json.dumps(encoded.unknown_ids),
        "supermoe_rec.hashed_ids": json.dumps(encoded.hashed_ids),
    }
    return pa.table(columns).replace_schema_metadata(meta)


def seen_ids(encoder: UserEncoder, users: pd.DataFrame) -> list[list[Any]]:
    """Each user's history as raw ids of one type, however the events wrote them: a CSV's list text parses to
    string tokens (``[1 2]`` -> ``'1', '2'``), a parquet holds integers. Integer-id tables give integers (the ids
    were checked when the users were encoded); vocab and hash tables give strings."""
    spec = encoder.history_features[0]
    table = encoder.schema.table(spec.table)
    cells = [list(c) for c in users[spec.column]]
    if table.vocab_spec is None and not table.hash:
        return [[int(float(v)) for v in cell] for cell in cells]
    if all(isinstance(v, (int, np.integer)) for cell in cells for v in cell):
        return cells
    return [[str(v) for v in cell] for cell in cells]


def embed(
    artifact: str | Path, events: str | Path, out: str | Path, batch_size: int = 1024, progress: bool = True
) -> dict[str, Any]:
    """Encode every user of ``events`` with the artifact; write ``out`` (parquet). Returns a summary (users, M,
    unknown and hashed id counts per feature)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    out = check_output(out, "--out", inputs=[events], suffixes=(".parquet",))
    encoder = UserEncoder.load(artifact)
    frame = read_table(events)
    users = encoder.user_rows(frame, str(events))
    encoded = encoder.encode(users, batch_size=batch_size, source=str(events), progress=progress)
    history = encoder.history_features
    seen = seen_ids(encoder, users) if history else [[] for _ in range(len(users))]
    with atomic_output(out) as part:
        pq.write_table(vectors_table(encoder, encoded, seen), part)
    return {
        "out": str(out),
        "users": len(encoded.user_keys),
        "dim": int(encoded.user.shape[1]),
        "unknown_ids": encoded.unknown_ids,
        "hashed_ids": encoded.hashed_ids,
    }


def read_vectors(path: str | Path, column: str = "user") -> tuple[pd.DataFrame, FloatArray]:
    """The frame of a ``vectors.parquet`` and its ``column`` as a [U, M] float32 matrix."""
    frame = read_table(path)
    if column not in frame.columns:
        raise DataError(str(path), f"missing column (columns are {list(frame.columns)})", column=column)
    cells = frame[column].to_numpy()
    if len(cells) and not all(isinstance(c, (list, tuple, np.ndarray)) for c in cells):
        vector_columns = [c for c in frame.columns if c == "user" or c.startswith("task_")]
        raise DataError(str(path), f"does not hold vectors (vector columns: {vector_columns})", column=column)
    widths = {len(c) for c in cells}
    if len(widths) != 1:
        raise DataError(str(path), f"vectors of different lengths {sorted(widths)}", column=column)
    return frame, np.stack([np.asarray(c, dtype=np.float32) for c in cells])


# ----------------------------------------------------------------------------------------------- search


def topk_exact(
    queries: torch.Tensor, items: torch.Tensor, k: int, exclude: Sequence[IntArray] | None = None, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, in the ranking order of :func:`supermoe_rec.objectives.ranking.top_k`.

    Args:
        queries: [U, M]. items: [N, M].
        exclude: per user, item rows that must not be returned.
        block: users per matmul ([block, N] scores at a time).

    Returns:
        (scores [U, k], item rows [U, k]), rank 1 first (ties: the smaller row first); -inf / -1 where fewer than k
        items remain.
    """
    U = queries.shape[0]
    scores_out = torch.full((U, k), float("-inf"))
    rows_out = torch.full((U, k), -1, dtype=torch.long)
    for start in range(0, U, block):
        end = min(start + block, U)
        scores = queries[start:end] @ items.T  # (b, N)
        mask = None
        if exclude is not None:
            user = np.concatenate([np.full(len(exclude[u]), u - start) for u in range(start, end)]).astype(np.int64)
            rows = np.concatenate([np.asarray(exclude[u], dtype=np.int64) for u in range(start, end)])
            mask = torch.zeros(scores.shape, dtype=torch.bool)
            if len(rows):
                mask[torch.from_numpy(user), torch.from_numpy(rows)] = True
        scores_out[start:end], rows_out[start:end] = top_k(scores, k, mask)
    return scores_out, rows_out


@dataclass
class FaissIndex:
    """An inverted-file inner-product index over [N, M] item vectors (``faiss.IndexIVFFlat``).

    Attributes:
        nlist: inverted lists (default ``sqrt(N)``, at most N / 39 so k-means has 39 points per centroid).
        nprobe: lists searched per query; more is slower and closer to exact.
    """

    index: Any
    ids: IntArray
    nlist: int
    nprobe: int

    @staticmethod
    def build(items: FloatArray, nprobe: int = 16, nlist: int | None = None, seed: int = 0) -> FaissIndex:
        """Train the coarse quantizer (k-means on at most 64 items per list) and add every item."""
        import faiss

        N, M = items.shape
        nlist = nlist or max(1, min(int(math.sqrt(N)), N // 39))
        quantizer = faiss.IndexFlatIP(M)
        index = faiss.IndexIVFFlat(quantizer, M, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # no warning for small catalogs
        data = np.ascontiguousarray(items, dtype=np.float32)
        sample = data
        if 64 * nlist < N:  # 64 points per centroid place the centroids well enough and keep training fast
            sample = data[np.random.default_rng(seed).choice(N, 64 * nlist, replace=False)]
        index.train(sample)
        index.add(data)
        index.nprobe = min(nprobe, nlist)
        return FaissIndex(index, np.arange(N, dtype=np.int64), nlist, index.nprobe)

    def search(
        self, queries: FloatArray, k: int, exclude: Sequence[IntArray] | None = None
    ) -> tuple[FloatArray, IntArray]:
        """(scores [U, k], item rows [U, k]) best first; -inf / -1 where the probed lists held fewer items."""
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k + extra)
        U = queries.shape[0]
        out_s = np.full((U, k), -np.inf, dtype=np.float32)
        out_r = np.full((U, k), -1, dtype=np.int64)
        for u in range(U):
            keep = rows[u] >= 0
            if exclude is not None and len(exclude[u]):
                keep &= ~np.isin(rows[u], exclude[u])
            r, s = rows[u][keep][:k], scores[u][keep][:k]
            out_r[u, : len(r)], out_s[u, : len(s)] = r, s
        return out_s, out_r


def retrieve(
    artifact: str | Path,
    vectors: str | Path,
    out: str | Path,
    k: int = 10,
    index: str = "exact",
    column: str = "user",
    nprobe: int = 16,
) -> dict[str, Any]:
    """Top-k items for every user of ``vectors`` (from :func:`embed`), excluding the user's ``seen_items``.

    Items are the artifact's :meth:`UserEncoder.item_vectors` rows the run saw as candidates. Writes ``out``
    (parquet, one row per (user, rank): the user column, ``rank`` 1..k, ``item`` raw id, ``item_row``, ``score``).
    """
    if index not in INDEXES:
        raise ConfigError(f"--index: unknown index {index!r} (use one of {INDEXES})")
    if k < 1:
        raise ConfigError(f"--k: must be at least 1, got {k}")
    if nprobe < 1:
        raise ConfigError(f"--nprobe: must be at least 1, got {nprobe}")
    out = check_output(out, "--out", inputs=[vectors], suffixes=(".parquet",))
    encoder = UserEncoder.load(artifact)
    check_vectors_source(encoder, vectors)
    frame, vectors_ = read_vectors(vectors, column)
    queries = encoder.queries(vectors_).numpy()
    items = encoder.item_vectors()
    if queries.shape[1] != items.shape[1]:
        raise DataError(
            str(vectors), f"vectors are {queries.shape[1]} wide, the artifact's items {items.shape[1]}", column=column
        )
    known = encoder.known_items()
    rows_of_known = torch.nonzero(known).squeeze(1).numpy()
    spec = encoder.candidate_feature
    assert spec is not None
    exclude: list[IntArray] = []
    seen = frame["seen_items"].to_numpy() if "seen_items" in frame.columns else [[] for _ in range(len(frame))]
    position = np.full(len(known), -1, dtype=np.int64)
    position[rows_of_known] = np.arange(len(rows_of_known))
    for cell in seen:
        values = np.asarray(list(cell))
        mapped = encoder.map_ids(values, spec, f"{vectors} (seen_items)") if len(values) else np.zeros(0, np.int64)
        pos = position[mapped]
        exclude.append(pos[pos >= 0])
    candidates = items[known]
    if index == "exact":
        s, r = topk_exact(torch.from_numpy(queries), candidates, k, exclude)
        scores, rows = s.numpy(), r.numpy()
    else:
        faiss_index = FaissIndex.build(candidates.numpy(), nprobe=nprobe)
        scores, rows = faiss_index.search(queries, k, exclude)
    item_rows = np.where(rows >= 0, rows_of_known[np.maximum(rows, 0)], -1)
    ids = encoder.item_ids()
    U = len(frame)
    user_col = encoder.schema.user_column
    keys = frame[user_col].to_numpy() if user_col in frame.columns else np.arange(U)
    table = pd.DataFrame(
        {
            user_col: np.repeat(keys, k),
            "rank": np.tile(np.arange(1, k + 1), U),
            "item": [ids[r] if r >= 0 else None for r in item_rows.reshape(-1)],
            "item_row": item_rows.reshape(-1),
            "score": scores.reshape(-1).astype(np.float32),
        }
    )
    table = table[table["item_row"] >= 0]
    with atomic_output(out) as part:
        table.to_parquet(part, index=False)
    return {"out": str(out), "users": U, "k": k, "index": index, "items": len(rows_of_known)}


# --------------------------------------------------------------------------------------------------- CLI


def embed_main(artifact: str, events: str, out: str, batch_size: int) -> int:
    summary = embed(artifact, events, out, batch_size)
    print(json.dumps(summary, indent=2))
    if any(summary["unknown_ids"].values()):
        print(f"note: ids outside the vocabulary (row 0): {summary['unknown_ids']}", file=sys.stderr)
    return 0


def retrieve_main(artifact: str, vectors: str, out: str, k: int, index: str, column: str, nprobe: int) -> int:
    print(json.dumps(retrieve(artifact, vectors, out, k, index, column, nprobe), indent=2))
    return 0


__all__ = ["FaissIndex", "embed", "read_vectors", "retrieve", "topk_exact", "vectors_table"]
