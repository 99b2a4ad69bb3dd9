"""``supermoe-rec schema infer``: propose a schema YAML for an interaction table, with the reason for each line.

Only the labels need naming; everything else is read off the column names, types and values, and every decision is
printed as a YAML comment next to the line it made, so the proposal can be checked line by line:

- the **user**, **group** (rows that share one history: a request or impression id) and **timestamp** columns are
  recognised by name (``user_id``, ``request_id``, ``timestamp``, ...), or named with ``--user``/``--group``/
  ``--timestamp``;
- a **list column** named like a history (``history``, ``hist_items``, ``recent_...``) becomes the per-group
  history, and the **candidate item** column (named like ``item_id``, or the one whose values the history holds)
  a sequence feature of length 1 sharing the history's table; other list columns become multi-valued pooled
  features;
- **text** columns get ``vocab: true`` tables; **integer** columns are ids, in a table sized from the data when
  they are dense (``max + 1`` rows), else in a vocab table (years, sparse ids); **float** columns become dense
  features;
- pooled features constant within every user are the user's **profile** (``side: user``);
- a **label** is binary when its values are 0 and 1, else a regression (``--label name:regression`` forces it);
  NaN means "not labelled" for that row.

Example::

    >>> frame = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": [3, 4, 5], "click": [1, 0, 1]})
    >>> print(infer_schema(frame, ["click"], name="demo").text)  # doctest: +ELLIPSIS
    # Proposed by ...
    name: demo
    user_column: user_id  # named like a user id
    ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from supermoe_rec.config.experiment import ConfigError
from supermoe_rec.data.lists import ListParseError, parse_list
from supermoe_rec.data.schema import Schema

USER_NAMES = r"user|users|user_?id|uid|userid|customer(_?id)?|member_?id|visitor_?id|account_?id|client_?id"
GROUP_NAMES = r"group(_?id)?|request_?id|req_?id|impression_?id|imp_?id|session_?id|query_?id|qid|page_?view_?id"
TIME_NAMES = r"ts|timestamp|time|event_?time|datetime|unix_?time|created_?at|event_?ts"
ITEM_NAMES = (
    r"item|items?_?id|iid|movie(_?id)?|product(_?id)?|video(_?id)?|article(_?id)?|sku|target(_?item)?|"
    r"candidate(_?id)?|ad_?id|doc_?id|song_?id|track_?id|book_?id|post_?id"
)
HISTORY_NAMES = r".*(hist|history|seq|sequence|recent|previous|past|behaviou?r|clicked|viewed|watched).*"
SAMPLE = 20_000  # rows examined for list and text detection


def _match(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name.strip(), flags=re.IGNORECASE) is not None


@dataclass
class ColumnInfo:
    """What a column holds: ``list`` (with its element kind), ``text``, ``int``, ``float``, ``time`` or ``other``."""

    name: str
    kind: str
    element: str = ""  # for lists: "text" or "int"
    distinct: int = 0
    missing: int = 0
    max_id: int = -1
    min_id: int = 0
    values: pd.Series | None = None  # the flattened values (lists) or the column itself


@dataclass
class InferredSchema:
    """The proposed schema as a mapping (``values``) and as commented YAML (``text``)."""

    values: dict[str, Any]
    text: str
    notes: list[str] = field(default_factory=list)


def _flatten(column: pd.Series) -> tuple[pd.Series, bool] | None:
    """(flat values, True) for a list column: lists/arrays, bracketed text, or space-joined integers; else None."""
    sample = column.dropna().head(SAMPLE)
    if sample.empty:
        return None
    first = sample.iloc[0]
    if isinstance(first, list | tuple | np.ndarray):
        flat = [v for cell in column.dropna() for v in cell]
        return pd.Series(flat, dtype=object), True
    if not isinstance(first, str):
        return None
    texts = sample.astype(str).str.strip()
    bracketed = texts.str.startswith("[") & texts.str.endswith("]")
    if bracketed.all():
        try:
            flat = [v for cell in column.dropna() for v in parse_list(str(cell), " ")]
        except ListParseError:
            return None
        return pd.Series(flat, dtype=object), True
    spaced = texts.str.contains(r"\s", regex=True)
    if spaced.any() and texts.str.fullmatch(r"(\s*-?\d+)*\s*").all():
        flat = [v for cell in column.dropna() for v in str(cell).split()]
        return pd.Series(flat, dtype=object), True
    return None


def _as_ints(values: pd.Series) -> pd.Series | None:
    """The values as integers when every one is a whole number (text or numeric), else None."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any() or not np.all(np.floor(numeric) == numeric):
        return None
    return numeric.astype(np.int64)


def describe(column: pd.Series) -> ColumnInfo:
    """The kind of values ``column`` holds (see :class:`ColumnInfo`)."""
    name = str(column.name)
    missing = int(column.isna().sum())
    if isinstance(column.dtype, pd.CategoricalDtype) or (
        pd.api.types.is_string_dtype(column) and column.dtype != object
    ):
        column = column.astype(object).where(column.notna(), None)  # pyarrow/pandas strings, categoricals
    if pd.api.types.is_datetime64_any_dtype(column):
        return ColumnInfo(name, "time", missing=missing)
    if pd.api.types.is_bool_dtype(column):
        return ColumnInfo(name, "int", distinct=2, missing=missing, max_id=1, values=column.astype(np.int64))
    flat = _flatten(column) if column.dtype == object else None
    if flat is not None:
        values = flat[0]
        ints = _as_ints(values) if len(values) else pd.Series([], dtype=np.int64)
        if ints is not None and (len(ints) == 0 or ints.min() >= 0):
            top = int(ints.max()) if len(ints) else -1
            return ColumnInfo(name, "list", "int", int(ints.nunique()), missing, top, 0, ints)
        return ColumnInfo(name, "list", "text", int(values.astype(str).nunique()), missing, values=values.astype(str))
    present = column.dropna()
    if column.dtype == object:
        return ColumnInfo(name, "text", distinct=int(present.astype(str).nunique()), missing=missing, values=present)
    if pd.api.types.is_integer_dtype(column):
        lo, hi = (int(present.min()), int(present.max())) if len(present) else (0, -1)
        return ColumnInfo(
            name, "int", distinct=int(present.nunique()), missing=missing, max_id=hi, min_id=lo, values=present
        )
    if pd.api.types.is_float_dtype(column):
        ints = _as_ints(present) if len(present) else None
        if ints is not None and missing == 0 and ints.nunique() <= 2 and set(ints.unique()) <= {0, 1}:
            return ColumnInfo(name, "int", distinct=int(ints.nunique()), max_id=1, values=ints)
        if ints is not None and missing:  # whole numbers with gaps: how CSV reads an integer column with blanks
            lo, hi = int(ints.min()), int(ints.max())
            return ColumnInfo(
                name, "int", distinct=int(ints.nunique()), missing=missing, max_id=hi, min_id=lo, values=ints
            )
        return ColumnInfo(name, "float", distinct=int(present.nunique()), missing=missing, values=present)
    return ColumnInfo(name, "other", missing=missing)


def _pick(
    columns: list[str], given: str | None, pattern: str, role: str, frame: pd.DataFrame
) -> tuple[str | None, str]:
    if given is not None:
        if given not in frame.columns:
            raise ConfigError(f"--{role}: no column {given!r} (columns are {list(frame.columns)})")
        return given, f"named with --{role}"
    for c in columns:
        if _match(pattern, c):
            return c, f"named like a {role} id" if role in ("user", "group") else f"named like a {role}"
    return None, ""


def _table_for_ids(name: str, info: ColumnInfo) -> tuple[dict[str, Any], str]:
    """A table for integer ids: sized ``max + 1`` when the ids are dense, else a vocabulary."""
    if info.min_id >= 0 and info.max_id + 1 <= max(2 * info.distinct, info.distinct + 16):
        return (
            {"name": name, "num_embeddings": info.max_id + 1},
            f"integer ids up to {info.max_id} ({info.distinct} distinct): max + 1 rows; a larger id in valid/test "
            "is an error (vocab: true would map it to row 0)",
        )
    span = f"{info.min_id}..{info.max_id}"
    return {"name": name, "vocab": True}, f"integer values {span}, only {info.distinct} distinct: a vocabulary"


def _table_for(name: str, info: ColumnInfo) -> tuple[dict[str, Any], str]:
    if info.kind == "text" or (info.kind == "list" and info.element == "text"):
        return {"name": name, "vocab": True}, f"text values ({info.distinct} distinct): a vocabulary"
    return _table_for_ids(name, info)


def _constant_per_user(frame: pd.DataFrame, user: str, column: str) -> bool:
    """Whether every user has one value of ``column`` (and users have several rows, so it means something)."""
    sample = frame[[user, column]].head(200_000)
    if len(sample) < 2 * sample[user].nunique():
        return False
    values = sample[column]
    if values.dtype == object and len(values) and not isinstance(values.dropna().iloc[0], str):
        values = values.map(lambda v: str(list(v)) if v is not None and not isinstance(v, str) else v)
    return bool((pd.DataFrame({"u": sample[user], "v": values}).groupby("u")["v"].nunique(dropna=False) <= 1).all())


def _task(frame: pd.DataFrame, spec: str) -> tuple[dict[str, Any], str]:
    name, _, forced = spec.partition(":")
    if name not in frame.columns:
        raise ConfigError(f"--label: no column {name!r} (columns are {list(frame.columns)})")
    values = pd.to_numeric(frame[name], errors="coerce")
    if values.isna().all():
        raise ConfigError(f"--label {name}: the column holds no numbers")
    present = values.dropna()
    missing = len(values) - len(present)
    where = f"; {missing} rows unlabelled (NaN)" if missing else ""
    if forced:
        if forced not in ("binary", "regression"):
            raise ConfigError(f"--label {spec}: the type is binary or regression")
        kind, why = forced, f"type given with --label{where}"
    elif set(present.unique()) <= {0.0, 1.0}:
        positives = int((present == 1).sum())
        kind, why = "binary", f"values 0/1: {positives} positives, {len(present) - positives} negatives{where}"
    else:
        kind, why = "regression", f"values {present.min():g}..{present.max():g}, not only 0/1{where}"
    return {"name": name, "type": kind, "label": name}, why


def infer_schema(
    frame: pd.DataFrame,
    labels: Sequence[str],
    *,
    user: str | None = None,
    group: str | None = None,
    timestamp: str | None = None,
    history: str | None = None,
    item: str | None = None,
    name: str = "table",
    source: str = "the table",
) -> InferredSchema:
    """Propose a schema for ``frame`` whose tasks are ``labels`` (``name`` or ``name:binary|regression``)."""
    if not labels:
        raise ConfigError("--label: name at least one label column (e.g. --label click)")
    columns = [str(c) for c in frame.columns]
    label_names = [spec.partition(":")[0] for spec in labels]
    rest = [c for c in columns if c not in label_names]
    user_col, user_why = _pick(rest, user, USER_NAMES, "user", frame)
    if user_col is None:
        raise ConfigError(f"no column is named like a user id; name it with --user (columns are {columns})")
    group_col, group_why = _pick([c for c in rest if c != user_col], group, GROUP_NAMES, "group", frame)
    time_col, time_why = _pick(
        [c for c in rest if c not in (user_col, group_col)], timestamp, TIME_NAMES, "timestamp", frame
    )
    notes: list[str] = []
    if time_col is not None and describe(frame[time_col]).kind not in ("int", "time"):
        notes.append(f"{time_col}: named like a timestamp but not integers; convert it to integer seconds to use it")
        time_col = None
    role_cols = {c for c in (user_col, group_col, time_col) if c}
    infos = {c: describe(frame[c]) for c in rest if c not in role_cols}

    # ---- history and candidate item
    lists = [c for c, i in infos.items() if i.kind == "list"]
    if history is not None:
        if history not in infos or infos[history].kind != "list":
            raise ConfigError(f"--history: {history!r} is not a list column (list columns: {lists})")
        hist_col: str | None = history
        hist_why = "named with --history"
    else:
        hist_col = next((c for c in lists if _match(HISTORY_NAMES, c)), None)
        hist_why = "a list column named like a history"
    scalar_ids = [c for c, i in infos.items() if i.kind in ("int", "text")]
    if item is not None:
        if item not in infos:
            raise ConfigError(f"--item: no column {item!r} among {list(infos)}")
        item_col: str | None = item
        item_why = "named with --item"
    else:
        item_col = next((c for c in scalar_ids if _match(ITEM_NAMES, c)), None)
        item_why = "named like an item id"
        if item_col is None and hist_col is not None:
            flat_history = infos[hist_col].values
            hist_values = set(map(str, flat_history.head(SAMPLE))) if flat_history is not None else set()
            best, best_share = None, 0.0
            for c in scalar_ids:
                column_values = infos[c].values
                if column_values is None or not len(column_values):
                    continue
                share = float(column_values.head(SAMPLE).astype(str).isin(hist_values).mean())
                if share > best_share:
                    best, best_share = c, share
            if best is not None and best_share >= 0.5:
                item_col, item_why = best, f"{best_share:.0%} of its values appear in {hist_col!r}"
    if hist_col is not None and group_col is None:
        raise ConfigError(
            f"{hist_col!r} looks like a history, which is carried once per group of rows that share it; no column is "
            "named like a group id: name it with --group (e.g. a request or impression id)"
        )

    tables: list[tuple[dict[str, Any], str]] = []
    sparse: list[tuple[dict[str, Any], str]] = []
    sequence: list[tuple[dict[str, Any], str]] = []
    dense: list[tuple[dict[str, Any], str]] = []
    skipped: list[str] = list(notes)

    # the user id, a profile feature
    user_info = describe(frame[user_col])
    table, why = _table_for(user_col, user_info)
    tables.append((table, f"{user_col}: {why}"))
    sparse.append(({"name": user_col, "column": user_col, "table": user_col, "side": "user"}, "the user id"))

    if hist_col is not None:
        hist_info = infos.pop(hist_col)
        item_info = infos.pop(item_col) if item_col is not None else None
        both = hist_info
        if item_info is not None:
            kinds = {hist_info.element if hist_info.element else hist_info.kind, item_info.kind}
            both = ColumnInfo(
                "item",
                "text" if "text" in kinds else "int",
                distinct=max(hist_info.distinct, item_info.distinct),
                max_id=max(hist_info.max_id, item_info.max_id),
                min_id=min(hist_info.min_id, item_info.min_id),
            )
        table, why = _table_for("item", both)
        tables.append((table, f"shared by the history{' and the candidate item' if item_col else ''}: {why}"))
        sequence.append(
            (
                {"name": hist_col, "column": hist_col, "table": "item", "multi_valued": True, "per_group": True},
                f"{hist_why}: once per group ({group_col!r}), read by the encoder",
            )
        )
        if item_col is not None:
            sequence.append(
                (
                    {"name": item_col, "column": item_col, "table": "item"},
                    f"the candidate item ({item_why}): a sequence feature of length 1, so it shares the history's "
                    "table",
                )
            )
        else:
            skipped.append("no candidate item column found: name it with --item, so the model sees what it scores")

    for column, info in infos.items():
        if info.kind == "list":
            table, why = _table_for(column, info)
            tables.append((table, f"{column}: {why}"))
            side = "user" if _constant_per_user(frame, user_col, column) else "item"
            sparse.append(
                (
                    {"name": column, "column": column, "table": column, "multi_valued": True, "side": side},
                    "a list column: pooled" + ("; the same for every row of a user: profile" if side == "user" else ""),
                )
            )
        elif info.kind in ("int", "text"):
            if info.distinct == len(frame) and len(frame) > 100 and column != item_col:
                skipped.append(f"{column}: a different value on every row (an identifier, not a feature)")
                continue
            table, why = _table_for(column, info)
            if info.missing and "vocab" not in table:
                table = {"name": column, "vocab": True}
                why = f"integer values with {info.missing} missing (row 0): a vocabulary"
            tables.append((table, f"{column}: {why}"))
            side = "user" if column != item_col and _constant_per_user(frame, user_col, column) else "item"
            role = "the candidate item" if column == item_col else "categorical"
            reason = role + ("; the same for every row of a user: profile" if side == "user" else "")
            if info.missing:
                reason += f"; {info.missing} missing values map to row 0"
            sparse.append(({"name": column, "column": column, "table": column, "side": side}, reason))
        elif info.kind == "float":
            if info.missing:
                skipped.append(f"{column}: numbers with {info.missing} missing values; fill them to use it as dense")
                continue
            dense.append(({"name": column, "column": column}, f"numbers ({info.distinct} distinct): a dense input"))
        else:
            skipped.append(f"{column}: {info.kind} values, not used")

    tasks = [_task(frame, spec) for spec in labels]
    proposal: dict[str, Any] = {"name": name, "user_column": user_col}
    if group_col:
        proposal["group_column"] = group_col
    if time_col:
        proposal["timestamp_column"] = time_col
    proposal["tables"] = [t for t, _ in tables]
    proposal["sparse_features"] = [f for f, _ in sparse]
    proposal["sequence_features"] = [f for f, _ in sequence]
    proposal["dense_features"] = [d for d, _ in dense]
    proposal["tasks"] = [t for t, _ in tasks]
    Schema.from_dict(proposal, source="inferred schema")  # the proposal must be a valid schema

    lines = [
        f"# Proposed by `supermoe-rec schema infer` from {source} ({len(frame)} rows, {len(columns)} columns).",
        "# Every decision is explained in the comment next to it: check them, then use this file as data.schema",
        "# with data.source: table (configs/byo.yaml). Tables and features are described in docs/data.md.",
        f"name: {name}",
        f"user_column: {user_col}  # {user_why}",
    ]
    if group_col:
        lines.append(
            f"group_column: {group_col}  # {group_why}: rows of a group share the user side (one encoder pass)"
        )
    if time_col:
        lines.append(f"timestamp_column: {time_col}  # {time_why}")
    for key, entries in (
        ("tables", tables),
        ("sparse_features", sparse),
        ("sequence_features", sequence),
        ("dense_features", dense),
        ("tasks", tasks),
    ):
        if not entries:
            lines.append(f"{key}: []")
            continue
        lines.append(f"{key}:")
        for entry, why in entries:
            flow = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=math.inf).strip()
            lines.append(f"  - {flow}  # {why}")
    if skipped:
        lines.append("# Not used:")
        lines += [f"#   {s}" for s in skipped]
    return InferredSchema(values=proposal, text="\n".join(lines) + "\n", notes=skipped)


def infer_command(
    table: str,
    labels: Sequence[str],
    user: str | None = None,
    group: str | None = None,
    timestamp: str | None = None,
    history: str | None = None,
    item: str | None = None,
) -> str:
    """The commented schema YAML for the table file at ``table`` (CSV, TSV or parquet)."""
    from supermoe_rec.data.features import read_table

    frame = read_table(table)
    labels = [part for spec in labels for part in spec.split(",") if part]
    return infer_schema(
        frame,
        labels,
        user=user,
        group=group,
        timestamp=timestamp,
        history=history,
        item=item,
        name=Path(table).resolve().parent.name if Path(table).stem in ("train", "training") else Path(table).stem,
        source=Path(table).name,
    ).text
