"""``UserEncoder``: the exported model at inference, with torch, numpy and pandas only (no TorchRec, no fbgemm,
no process group).

Dimension letters: U users, G users of one forward pass, J candidates per user, B = G * J rows, L history length,
D embedding dim, M model dim, T tasks, V rows of the candidate item table.

What runs: the embedding tables of the artifact are plain tensors, looked up with ``torch.nn.functional``
(``embedding_bag`` with the pooling TorchRec used: mean for tables read by a multi-valued feature, sum otherwise);
the table-free part is the run's own :class:`~supermoe_rec.models.supermoe.SuperMoEOverArch`, rebuilt from the
manifest's config and loaded from its state_dict, so its forward is exactly the training forward (see
``docs/serving.md`` for why this is the fallback rather than a ``torch.export`` program).

Input (``events``, a DataFrame in the schema's columns), in either of two shapes:

- **one row per user**, with the history column(s) holding lists of ids (the training table's layout); a user
  with several rows is represented by the last one (by the schema's timestamp column when present);
- **one row per event** (the history column is absent): each row is an interaction, its item read from the
  candidate item column (the per-row sequence feature sharing the history's table, ``item`` on ml100k-mt); a
  user's history is their items ordered by timestamp (stable), the last ``max_history`` kept; the profile comes
  from their last event.

Ids are mapped by training's own code (:mod:`supermoe_rec.data.features`): list cells parsed as training parses
them, ``vocab`` tables through the run's vocabulary (unknown values to row 0, counted), ``hash`` tables hashed into
range (counted), other tables must hold integer ids inside the table (else the same
:class:`~supermoe_rec.data.errors.DataError` as training, naming the column, and the row where it is known).

Routing: every MoE router runs dropless, so a user's vector never depends on the users sharing its batch.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F

from supermoe_rec.config.experiment import Arch, ModelConfig, from_dict
from supermoe_rec.data.errors import DataError, first_true
from supermoe_rec.data.features import feature_values, table_ids
from supermoe_rec.data.jagged import offsets_from_lengths
from supermoe_rec.data.schema import ITEM_CANDIDATES, FeatureSide, FeatureSpec, Schema
from supermoe_rec.models.layout import FeatureLayout
from supermoe_rec.models.supermoe import SuperMoEOverArch
from supermoe_rec.modules.causal import CausalMoEEncoder
from supermoe_rec.modules.gating import TopKRouter
from supermoe_rec.modules.towers import MultiTaskTowers
from supermoe_rec.modules.transformer import MoETransformerEncoder
from supermoe_rec.serving import artifact as art

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

# Catalog key of the [V] bool mask of candidate item rows seen in the run's samples (the retrievable items).
KNOWN_ITEMS = "candidates.known"
# Rows of one forward pass are capped so that the [B, L, D] history tensor of a candidate batch stays small.
MAX_ROW_POSITIONS = 1 << 22


# --------------------------------------------------------------------------------------------- the model


def build_over_arch(model: ModelConfig, schema: Schema, max_history: int) -> SuperMoEOverArch:
    """The table-free part of a transformer-arch model for ``schema``, as ``models.factory.build_model`` builds it.

    Only shapes matter: the weights come from the artifact's state_dict (loaded strictly, so a shape drift between
    this and the factory is an error at export, where :func:`supermoe_rec.serving.export_artifact.export_artifact`
    also checks the outputs against the training model).
    """
    if model.arch not in (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER):
        raise ValueError(f"model.arch {model.arch.value!r} has no [USER] representation to serve")
    layout = FeatureLayout.from_schema(schema)
    dims = {
        f.name: schema.table(f.table).embedding_dim or model.embedding_dim
        for f in (*schema.sparse_features, *schema.sequence_features)
    }
    history_dims = {dims[n] for n in layout.history}
    profile_dim = sum(dims[n] for n in layout.profile)
    item_dim = sum(dims[n] for n in layout.item)
    tasks = schema.task_specs()
    dense = model.arch is Arch.DENSE_TRANSFORMER
    enc = model.encoder
    encoder_cls = CausalMoEEncoder if enc.generative else MoETransformerEncoder
    encoder = encoder_cls(
        model,
        num_tasks=len(tasks),
        input_dim=history_dims.pop() if history_dims else model.embedding_dim,
        dense_hidden_for_moe_blocks=model.moe.top_k * model.moe.expert_hidden if dense else None,
        max_history=max_history,
    )
    read_user = bool(getattr(model.towers, "read_user", False))
    towers = MultiTaskTowers(
        tasks,
        SuperMoEOverArch.tower_input_dim(
            enc.d_model, item_dim, profile_dim, layout.num_dense, enc.item_interaction, read_user
        ),
        model.towers.hidden,
    )
    next_items_table = schema.next_items_table()
    # SuperMoERec passes SparseArch.embedding_dim, the model's default width.
    return SuperMoEOverArch(
        encoder,
        towers,
        layout,
        profile_dim,
        model.embedding_dim,
        item_dim,
        enc.item_interaction,
        read_user=read_user,
        item_table_dim=(next_items_table.embedding_dim or model.embedding_dim) if next_items_table else 0,
    )


def make_dropless(module: torch.nn.Module) -> int:
    """Switch every MoE router under ``module`` to dropless routing; returns how many routers there are."""
    routers = [m for m in module.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.dropless = True
    return len(routers)


@dataclass
class _Embeddings:
    """Duck type of :class:`supermoe_rec.modules.embeddings.SparseOutput` (that module imports TorchRec).

    Serving pads each sequence feature itself, so ``padded`` selects rows of ``sequences``; ``values`` holds only
    the next-items candidates, which are empty at inference.
    """

    pooled: dict[str, torch.Tensor]
    sequences: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def padded(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        padded = self.sequences[name]  # (B, L, D)
        if rows is None:
            return padded
        picked = padded[rows]  # (R, L, D): trimmed to the chosen rows' longest, as SparseOutput.padded does
        width = int(self.lengths[name][rows].max()) if len(rows) else 0
        return picked[:, :width]


@dataclass
class _NoIds:
    """An empty ``KeyedJaggedTensor`` entry over B rows: the next-items label features, absent at inference."""

    rows: int

    def to_padded_dense(self, desired_length: int, padding_value: int = 0) -> torch.Tensor:
        return torch.full((self.rows, desired_length), padding_value, dtype=torch.long)

    def values(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)

    def lengths(self) -> torch.Tensor:
        return torch.zeros(self.rows, dtype=torch.long)


@dataclass
class _Rows:
    """The fields of :class:`supermoe_rec.data.batch.Batch` the over-arch reads (no labels at inference)."""

    group_index: torch.Tensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    sequence_features: dict[str, _NoIds] = field(default_factory=dict)
    # Serving encodes each user's whole history and reads the state after it (the per-group layout).
    position_index: torch.Tensor | None = None
    target_start: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.group_index.shape[0])


@dataclass
class Jagged:
    """Ids of one feature for B rows: ``values`` [Σ lengths] int64, ``lengths`` [B] int64."""

    values: torch.Tensor
    lengths: torch.Tensor

    @staticmethod
    def empty(rows: int) -> Jagged:
        return Jagged(torch.zeros(0, dtype=torch.long), torch.zeros(rows, dtype=torch.long))


@dataclass
class MappedUsers:
    """G users as table rows: profile and history ids per feature (``Jagged`` over G rows), dense [G, F]."""

    num_users: int
    profile: dict[str, Jagged]
    history: dict[str, Jagged]
    dense: torch.Tensor


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _padded(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[Σ lengths, D] rows -> [B, max length, D], left-aligned, zeros at padding."""
    B = int(lengths.shape[0])
    width = int(lengths.max()) if B else 0
    out = rows.new_zeros(B, width, rows.shape[1])
    if rows.shape[0]:
        row = torch.repeat_interleave(torch.arange(B), lengths)
        pos = torch.arange(rows.shape[0]) - _offsets(lengths)[:-1][row]
        out[row, pos] = rows
    return out


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Encoded:
    """What :meth:`UserEncoder.encode` returns, users in the order they first appear in the input.

    Attributes:
        user_keys: [U] the schema's user column values.
        user: [U, M] float32 universal [USER] vectors.
        tasks: task name -> [U, M] float32 task representations.
        scores: task name -> [U, J] per-candidate predictions as the model returns them (a logit for binary
            tasks, a value for regression tasks); empty without candidates.
        history_lengths: [U] history items each user was encoded with (after truncation to ``max_history``).
        unknown_ids: feature -> ids mapped to the out-of-vocabulary row 0 (vocab tables).
        hashed_ids: feature -> ids hashed into range (hash tables).
    """

    user_keys: npt.NDArray[Any]
    user: FloatArray
    tasks: dict[str, FloatArray]
    scores: dict[str, FloatArray] = field(default_factory=dict)
    history_lengths: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    unknown_ids: dict[str, int] = field(default_factory=dict)
    hashed_ids: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ encoder


class UserEncoder:
    """An exported run at inference: ``UserEncoder.load(DIR).encode(events)``.

    Example (``artifact`` written by ``supermoe-rec export --run R --artifact DIR``)::

        enc = UserEncoder.load("artifacts/ml100k")
        out = enc.encode(events, candidates=[[50, 181, 100]] * n_users)
        out.user           # [U, M] [USER] vectors
        out.scores["like"]  # [U, 3] logits of "like" for each user's three candidates
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        schema: Schema,
        over_arch: SuperMoEOverArch,
        tables: dict[str, torch.Tensor],
        catalog: dict[str, torch.Tensor],
        vocabularies: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.schema = schema
        self.over_arch = over_arch.eval()
        self.tables = tables
        self.catalog = catalog
        self.vocabularies = vocabularies
        self.max_history = int(manifest["schema"]["max_history"])
        self.task_names = [t.name for t in schema.tasks]
        self.layout = FeatureLayout.from_schema(schema)
        # The next-items feature is per group too, but it is a training label (future items), never an input.
        history = [f for f in schema.sequence_features if f.per_group and f.name != schema.next_items]
        self.history_features = history
        candidate = [f for f in schema.sequence_features if not f.per_group and history and f.table == history[0].table]
        # The per-row feature that names the candidate item (the target item); absent in history-only schemas.
        self.candidate_feature: FeatureSpec | None = candidate[0] if candidate else None
        self._mean_tables = {f.table for f in schema.sparse_features if f.multi_valued}

    # -------------------------------------------------------------------------------------------- loading

    @staticmethod
    def load(directory: str | Path, verify: bool = True) -> UserEncoder:
        """Load an artifact directory; checks every file's SHA-256 first (``verify=False`` skips that)."""
        directory = Path(directory)
        manifest = art.read_manifest(directory)
        if verify:
            art.verify(directory, manifest)
        try:
            schema = schema_from_manifest(manifest)
            model_cfg = from_dict(manifest["config"]["model"], ModelConfig)
        except (KeyError, TypeError, ValueError) as exc:
            raise art.ArtifactError(f"{directory / art.MANIFEST}: cannot read the schema or config ({exc})") from exc
        over_arch = build_over_arch(model_cfg, schema, int(manifest["schema"]["max_history"]))
        state = art.load_tensors(directory / art.OVER_ARCH)
        try:
            over_arch.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise art.ArtifactError(f"{directory / art.OVER_ARCH}: does not fit the manifest's model ({exc})") from exc
        make_dropless(over_arch)
        tables = art.load_tensors(directory / art.TABLES)
        for t in schema.tables:
            if t.name not in tables:
                raise art.ArtifactError(f"{directory / art.TABLES}: table {t.name!r} is missing")
            if tables[t.name].shape[0] != t.num_embeddings:
                raise art.ArtifactError(
                    f"{directory / art.TABLES}: table {t.name!r} has {tables[t.name].shape[0]} rows, "
                    f"the schema says {t.num_embeddings}"
                )
        catalog = art.load_tensors(directory / art.ITEM_CATALOG)
        vocabularies: dict[str, Any] = {}
        if art.VOCAB in manifest["files"]:
            from supermoe_rec.data.vocab import load_vocabularies

            vocabularies = dict(load_vocabularies(directory / art.VOCAB))
        return UserEncoder(directory, manifest, schema, over_arch, tables, catalog, vocabularies)

    @property
    def dim(self) -> int:
        """M, the width of the [USER] vector."""
        return int(self.over_arch.encoder.d_model)

    # ------------------------------------------------------------------------------------------ id mapping

    def map_ids(
        self,
        values: npt.NDArray[Any],
        spec: FeatureSpec,
        source: str,
        counts: Encoded | None = None,
        offsets: IntArray | None = None,
    ) -> IntArray:
        """Table rows of raw ``values`` of feature ``spec`` by training's mapping
        (:func:`~supermoe_rec.data.features.table_ids`: the run's vocabulary, hashing, or integer ids inside the
        table; the same errors, naming the row when ``offsets`` [rows + 1] of ``values`` per input row are given).
        Unknown and hashed values are added to ``counts``."""
        table = self.schema.table(spec.table)
        vocabulary = self.vocabularies.get(table.name)
        mapped = table_ids(values, spec, table, source, vocabulary, offsets)
        if counts is not None:
            if vocabulary is not None:
                counts.unknown_ids[spec.name] = counts.unknown_ids.get(spec.name, 0) + mapped.unknown
            elif table.hash:
                counts.hashed_ids[spec.name] = counts.hashed_ids.get(spec.name, 0) + mapped.hashed
        return mapped.ids

    # ------------------------------------------------------------------------------------------ user rows

    def user_rows(self, events: pd.DataFrame, source: str = "events") -> pd.DataFrame:
        """One row per user (first-appearance order) with the profile, dense and history columns (histories as
        lists of raw ids, oldest first, at most ``max_history``); see the module docstring for the two shapes."""
        s = self.schema
        if events.empty:
            raise DataError(source, "no rows (empty table)")
        user_col = s.user_column
        profile = [f for f in s.sparse_features if f.side is FeatureSide.USER]
        needed = [user_col, *(f.column for f in profile), *(d.column for d in s.dense_features)]
        history_cols = [f.column for f in self.history_features]
        per_user = all(c in events.columns for c in history_cols) and bool(history_cols)
        if not per_user:
            if self.candidate_feature is None:
                raise DataError(source, f"missing history column(s) {history_cols}", column=history_cols[0])
            needed.append(self.candidate_feature.column)
        for column in dict.fromkeys(needed):
            if column not in events.columns:
                raise DataError(source, f"missing column (columns are {list(events.columns)})", column=column)
        missing = events[user_col].isna().to_numpy()
        if missing.any():
            raise DataError(source, "missing user id", row=first_true(missing), column=user_col)
        n = len(events)
        keys = events[user_col].to_numpy()
        codes, uniques = pd.factorize(keys, sort=False)  # users in first-appearance order
        U = len(uniques)
        order = np.arange(n)
        ts = s.timestamp_column
        if ts is not None and ts in events.columns:
            order = np.lexsort((order, events[ts].to_numpy()))  # by time, then input order
        if n == U:
            last = np.arange(n)[np.argsort(codes, kind="stable")]
        else:
            rank = np.empty(n, dtype=np.int64)
            rank[order] = np.arange(n)
            last_rank = np.full(U, -1, dtype=np.int64)
            np.maximum.at(last_rank, codes, rank)
            last = order[last_rank]  # each user's last row (by time)
        out: dict[str, Any] = {user_col: uniques}
        for column in dict.fromkeys(d.column for d in s.dense_features):
            out[column] = events[column].to_numpy()[last]
        for spec in profile:
            out[spec.column] = self._cells(events, spec, last, source)
        if per_user:
            for spec in self.history_features:
                out[spec.column] = self._cells(events, spec, last, source, keep_last=self.max_history)
        else:
            assert self.candidate_feature is not None
            # The histories are built from the events' item column: its ids are checked here, where an error can
            # name that column and the events row (later the history is a column the file does not have).
            spec = self.candidate_feature
            raw, lengths = feature_values(events[spec.column].to_numpy(), spec, s.table(spec.table), source)
            self.map_ids(raw, spec, source, offsets=offsets_from_lengths(lengths))
            by_user = order[np.argsort(codes[order], kind="stable")]  # grouped by user, in time order within
            items = events[self.candidate_feature.column].to_numpy()[by_user]
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=U))])
            lists = [list(items[max(a, b - self.max_history) : b]) for a, b in itertools.pairwise(bounds)]
            for column in dict.fromkeys(history_cols):
                out[column] = lists
        return pd.DataFrame(out)

    # ------------------------------------------------------------------------------------------- lookups

    def _pool(self, spec: FeatureSpec, ids: Jagged) -> torch.Tensor:
        """[B, D] pooled rows of a pooled feature: mean over a multi-valued table, sum otherwise (as TorchRec)."""
        mode = "mean" if spec.table in self._mean_tables else "sum"
        weight = self.tables[spec.table]
        return F.embedding_bag(ids.values, weight, _offsets(ids.lengths)[:-1], mode=mode)

    def _cells(
        self, events: pd.DataFrame, spec: FeatureSpec, rows: IntArray, source: str, keep_last: int | None = None
    ) -> list[Any]:
        """Feature ``spec``'s cells of events ``rows``, parsed and checked as training reads the column
        (:func:`~supermoe_rec.data.features.feature_values`, so errors name the events row): a list of ids per row
        for a list column (its last ``keep_last`` ids), the raw value otherwise."""
        values, lengths = feature_values(events[spec.column].to_numpy(), spec, self.schema.table(spec.table), source)
        if not spec.multi_valued:
            return list(values[rows])
        offsets = offsets_from_lengths(lengths)
        starts = offsets[rows] if keep_last is None else np.maximum(offsets[rows], offsets[rows + 1] - keep_last)
        return [list(values[a:b]) for a, b in zip(starts, offsets[rows + 1], strict=True)]

    def _jagged(self, cells: npt.NDArray[Any], spec: FeatureSpec, source: str, counts: Encoded) -> Jagged:
        """Table rows of one feature's cells (from :meth:`user_rows`), mapped as training maps them."""
        values, lengths = feature_values(cells, spec, self.schema.table(spec.table), source)
        ids = self.map_ids(values, spec, source, counts) if len(values) else np.zeros(0, dtype=np.int64)
        return Jagged(torch.from_numpy(ids), torch.from_numpy(lengths))

    def _catalog(self, name: str, rows: torch.Tensor) -> Jagged:
        """Ids of item-side feature ``name`` for candidate item rows ``rows`` [B] (from the export's catalog)."""
        values, offsets = self.catalog[f"{name}.values"], self.catalog[f"{name}.offsets"]
        rows = rows.clamp(max=offsets.shape[0] - 2)
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        if int(lengths.sum()) == 0:
            return Jagged(torch.zeros(0, dtype=torch.long), lengths)
        index = torch.repeat_interleave(starts, lengths) + (
            torch.arange(int(lengths.sum())) - torch.repeat_interleave(_offsets(lengths)[:-1], lengths)
        )
        return Jagged(values[index], lengths)

    # ------------------------------------------------------------------------------------------- forward

    def map_users(self, users: pd.DataFrame, counts: Encoded, source: str = "events") -> MappedUsers:
        """Map the raw ids of G user rows (from :meth:`user_rows`) to table rows."""
        s = self.schema
        profile = {}
        for spec in s.sparse_features:
            if spec.side is FeatureSide.USER:
                profile[spec.name] = self._jagged(users[spec.column].to_numpy(), spec, source, counts)
        history = {
            spec.name: self._jagged(users[spec.column].to_numpy(), spec, source, counts)
            for spec in self.history_features
        }
        dense = torch.zeros(len(users), len(s.dense_features))
        for j, d in enumerate(s.dense_features):
            values = pd.to_numeric(users[d.column], errors="coerce").to_numpy(np.float64)
            if not np.isfinite(values).all():
                row = first_true(~np.isfinite(values))
                raise DataError(
                    source, f"dense value is not a finite number: {users[d.column].iloc[row]!r}", column=d.column
                )
            dense[:, j] = torch.from_numpy(values.astype(np.float32))
        return MappedUsers(len(users), profile, history, dense)

    @torch.no_grad()
    def forward_mapped(
        self, users: MappedUsers, candidate_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass over G mapped users, each scored on J candidate item rows.

        Args:
            users: G users' table rows (:meth:`map_users`).
            candidate_rows: [G, J] item-table rows, or None (then J = 1 and the predictions mean nothing).

        Returns:
            user [G, M], tasks [G, T, M], predictions {task: [G, J]}.
        """
        s = self.schema
        G = users.num_users
        J = 1 if candidate_rows is None else int(candidate_rows.shape[1])
        B = G * J
        group_index = torch.arange(G).repeat_interleave(J)  # (B,)
        leader = torch.arange(G) * J  # (G,) first row of each user
        pooled: dict[str, torch.Tensor] = {}
        sequences: dict[str, torch.Tensor] = {}
        lengths: dict[str, torch.Tensor] = {}
        flat = None if candidate_rows is None else candidate_rows.reshape(-1)  # (B,)
        for spec in s.sparse_features:
            if spec.side is FeatureSide.USER:
                pooled[spec.name] = self._pool(spec, users.profile[spec.name])[group_index]  # (B, D)
            elif flat is None:
                pooled[spec.name] = self._pool(spec, Jagged.empty(B))
            else:
                pooled[spec.name] = self._pool(spec, self._catalog(spec.name, flat))
        for spec in s.sequence_features:
            table = self.tables[spec.table]
            if spec.name == s.next_items:  # a label: no future items at inference
                sequences[spec.name] = table.new_zeros(B, 0, table.shape[1])
                lengths[spec.name] = torch.zeros(B, dtype=torch.long)
            elif spec.per_group:
                ids = users.history[spec.name]
                rows = _padded(F.embedding(ids.values, table), ids.lengths)  # (G, L, D)
                full = rows.new_zeros(B, rows.shape[1], rows.shape[2])  # history on each user's first row only
                full[leader] = rows
                length = torch.zeros(B, dtype=torch.long)
                length[leader] = ids.lengths
                sequences[spec.name], lengths[spec.name] = full, length
            elif flat is not None and spec is self.candidate_feature:
                sequences[spec.name] = F.embedding(flat, table).unsqueeze(1)  # (B, 1, D)
                lengths[spec.name] = torch.ones(B, dtype=torch.long)
            elif flat is not None and f"{spec.name}.values" in self.catalog:
                ids = self._catalog(spec.name, flat)
                sequences[spec.name] = _padded(F.embedding(ids.values, table), ids.lengths)
                lengths[spec.name] = ids.lengths
            else:
                sequences[spec.name] = table.new_zeros(B, 0, table.shape[1])
                lengths[spec.name] = torch.zeros(B, dtype=torch.long)
        rows_ = _Rows(
            group_index=group_index, dense_features=users.dense[group_index], labels=torch.zeros(B, len(s.tasks))
        )
        next_table = s.next_items_table()
        candidates: dict[str, torch.Tensor] = {}
        if next_table is not None:  # the next-items head reads its candidates too: none at inference
            width = self.tables[next_table.name].shape[1]
            sequences[ITEM_CANDIDATES] = torch.zeros(B, 0, width)
            lengths[ITEM_CANDIDATES] = torch.zeros(B, dtype=torch.long)
            candidates = {ITEM_CANDIDATES: torch.zeros(0, width)}
            rows_.sequence_features = {name: _NoIds(B) for name in (ITEM_CANDIDATES, s.next_items or "")}
        out = self.over_arch(cast(Any, _Embeddings(pooled, sequences, lengths, candidates)), cast(Any, rows_))
        assert out.user is not None and out.task_representations is not None
        predictions = {name: out.predictions[name].reshape(G, J) for name in self.task_names}
        return out.user, out.task_representations, predictions

    def _chunks(self, users: pd.DataFrame, J: int, batch_size: int) -> Iterator[tuple[int, int]]:
        longest = max((max((len(x) for x in users[f.column]), default=0) for f in self.history_features), default=0)
        per_user = J * max(1, longest) * max(t.shape[1] for t in self.tables.values())
        step = max(1, min(batch_size, MAX_ROW_POSITIONS // max(per_user, 1)))
        for start in range(0, len(users), step):
            yield start, min(start + step, len(users))

    def encode(
        self,
        events: pd.DataFrame,
        candidates: Sequence[Sequence[Any]] | npt.NDArray[Any] | None = None,
        batch_size: int = 1024,
        source: str = "events",
        progress: bool = False,
    ) -> Encoded:
        """[USER] vectors, task representations and (with ``candidates``) per-task scores of every user in ``events``.

        Args:
            events: per-user rows or per-event rows in the schema's columns (see the module docstring).
            candidates: [U, J] raw candidate item ids per user (in the order users first appear in ``events``), in
                the candidate item column's id space (mapped like that column in training).
            batch_size: users per forward pass (fewer when candidates make a pass large).
            source: the input's name in error messages.
            progress: show a tqdm progress bar.
        """
        users = self.user_rows(events, source)
        U = len(users)
        result = Encoded(
            user_keys=users[self.schema.user_column].to_numpy(), user=np.zeros((0, self.dim), np.float32), tasks={}
        )
        rows: torch.Tensor | None = None
        if candidates is not None:
            if self.candidate_feature is None:
                raise DataError(source, "this model has no candidate item feature to score candidates with")
            raw = np.asarray(candidates)
            if raw.ndim != 2 or raw.shape[0] != U:
                raise DataError(source, f"candidates must be [users={U}, J], got shape {list(raw.shape)}")
            mapped = self.map_ids(raw.reshape(-1), self.candidate_feature, f"{source} (candidates)", result)
            rows = torch.from_numpy(mapped).view(U, -1)
        J = 1 if rows is None else int(rows.shape[1])
        user_parts, task_parts, length_parts = [], [], []
        score_parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.task_names}
        chunks = list(self._chunks(users, J, batch_size))
        bar: Any = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=U, desc="encode users", unit="user", dynamic_ncols=True)
        for start, end in chunks:
            part = users.iloc[start:end]
            batch_users = self.map_users(part, result, source)
            user, tasks, preds = self.forward_mapped(batch_users, None if rows is None else rows[start:end])
            user_parts.append(user)
            task_parts.append(tasks)
            history = list(batch_users.history.values())
            length_parts.append(history[0].lengths if history else torch.zeros(len(part), dtype=torch.long))
            for name in self.task_names:
                score_parts[name].append(preds[name])
            if bar is not None:
                bar.update(end - start)
        if bar is not None:
            bar.close()
        result.user = torch.cat(user_parts).float().numpy()
        reps = torch.cat(task_parts).float().numpy()
        result.tasks = {name: reps[:, t] for t, name in enumerate(self.task_names)}
        result.history_lengths = torch.cat(length_parts).numpy().astype(np.int64)
        if rows is not None:
            result.scores = {n: torch.cat(p).float().numpy() for n, p in score_parts.items()}
        return result

    # -------------------------------------------------------------------------------------------- items

    @property
    def retrieval(self) -> str:
        """How items are scored against [USER] vectors: ``score_items`` (the next-items head the model trained),
        ``item_proj`` (the towers' projection of the item features) or ``table`` (the raw candidate table)."""
        if self.over_arch.item_table_dim:
            return "score_items"
        return "item_proj" if self.over_arch.item_proj is not None else "table"

    @torch.no_grad()
    def queries(self, user: torch.Tensor | npt.NDArray[np.float32]) -> torch.Tensor:
        """[U, M] [USER] vectors -> [U, D'] retrieval queries against :meth:`item_vectors` (inner product).

        With the next-items head this is the model's own ``user_query`` (the learned projection to the item table),
        so ``queries(u) @ item_vectors().T`` equals the model's ``score_items``; otherwise the vectors themselves.
        """
        user = torch.as_tensor(user, dtype=torch.float32)
        if self.over_arch.item_table_dim:
            out: torch.Tensor = self.over_arch.user_query(user)
            return out
        return user

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """[V, D'] a vector per candidate item row, paired with :meth:`queries` by inner product, for retrieval.

        - With the next-items objective: the rows of the item table it scores (``score_items``).
        - Else, with ``item_interaction``: the model's projection of each item's features into the [USER] space
          (the towers' match term), applied to every catalog item.
        - Else the candidate table's rows, when their width equals M.
        """
        spec = self.candidate_feature
        if spec is None:
            raise ValueError("this model has no candidate item feature: nothing to retrieve")
        next_table = self.schema.next_items_table()
        if self.over_arch.item_table_dim and next_table is not None:
            return self.tables[next_table.name]
        n = self.schema.table(spec.table).num_embeddings
        proj = self.over_arch.item_proj
        if proj is None:
            table = self.tables[spec.table]
            if table.shape[1] != self.dim:
                raise ValueError(
                    f"no item projection (model.encoder.item_interaction is off) and table {spec.table!r} is "
                    f"{table.shape[1]} wide, not M={self.dim}: items and [USER] vectors live in different spaces"
                )
            return table
        parts = []
        for start in range(0, n, 65536):
            rows = torch.arange(start, min(start + 65536, n))
            item = []
            for name in self.layout.item:
                f = next(x for x in (*self.schema.sparse_features, *self.schema.sequence_features) if x.name == name)
                if f is spec:
                    item.append(F.embedding(rows, self.tables[f.table]))
                elif f in self.schema.sparse_features:
                    item.append(self._pool(f, self._catalog(name, rows)))
                else:
                    ids = self._catalog(name, rows)
                    item.append(
                        F.embedding_bag(ids.values, self.tables[f.table], _offsets(ids.lengths)[:-1], mode="sum")
                    )
            parts.append(proj(torch.cat(item, dim=1)))
        return torch.cat(parts)

    def known_items(self) -> torch.Tensor:
        """[V] bool, the candidate item rows the run saw as candidates (all rows for an older artifact)."""
        spec = self.candidate_feature
        assert spec is not None
        n = self.schema.table(spec.table).num_embeddings
        mask = self.catalog.get(KNOWN_ITEMS)
        return mask.bool() if mask is not None else torch.ones(n, dtype=torch.bool)

    def item_ids(self) -> npt.NDArray[Any]:
        """[V] the raw id of every candidate item row (vocabulary tokens for a vocab table, else the row itself)."""
        spec = self.candidate_feature
        assert spec is not None
        vocab = self.vocabularies.get(spec.table)
        n = self.schema.table(spec.table).num_embeddings
        if vocab is not None:
            return np.array([None, *vocab.tokens], dtype=object)
        return np.arange(n, dtype=np.int64)


def _json_ready(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _json_ready(getattr(value, f.name)) for f in dataclasses.fields(value) if not f.name.startswith("_")
        }
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def schema_as_dict(schema: Schema) -> dict[str, Any]:
    """The schema as JSON-ready values (enums by value, private fields dropped)."""
    out: dict[str, Any] = _json_ready(schema)
    return out


def schema_from_manifest(manifest: dict[str, Any]) -> Schema:
    """The :class:`Schema` stored in a manifest (tables carry their final row counts, vocab tables included)."""
    schema = from_dict({**manifest["schema"]["schema"], "_source": "artifact manifest"}, Schema)
    schema.validate()
    return schema


__all__ = ["Encoded", "UserEncoder", "build_over_arch", "make_dropless", "schema_as_dict", "schema_from_manifest"]
