"""Where a command writes its result: checked before any work, written to a temporary file and renamed into place.

A result file is never half-written (a crash or Ctrl-C leaves the old file, or none), never one of the command's
inputs, never a directory, and carries the suffix of its format.

Example::

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = check_output(Path(tmp) / "v.parquet", "--out")
    ...     with atomic_output(out) as part:
    ...         _ = part.write_text("x")
    ...     print(out.read_text(), sorted(p.name for p in Path(tmp).iterdir()))
    x ['v.parquet']
    >>> check_output("v.csv", "--out", suffixes=(".parquet",))
    Traceback (most recent call last):
    ...
    supermoe_rec.config.base.ConfigError: --out: v.csv: the result is parquet; name the file *.parquet
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from supermoe_rec.config.experiment import ConfigError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(out: str | Path, key: str, inputs: Sequence[str | Path] = (), suffixes: Sequence[str] = ()) -> Path:
    """``out`` as a :class:`Path`, refused (a :class:`ConfigError` naming ``key``) when it is a directory, one of
    ``inputs``, lacks one of ``suffixes``, or lies under a file."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory; name the file to write")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{key}: {path}: the result is {suffixes[0][1:]}; name the file *{suffixes[0]}")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise ConfigError(f"{key}: {path} is also an input of this command ({source}); writing it would destroy it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}: {path}: {parent} is a file, not a directory")
            break
    return path


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an error, rename it onto ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create its directory ({exc.strerror or exc})") from exc
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield part
        os.replace(part, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def json_safe(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN), and the dotted paths of
    the replaced values.

    Example::

        >>> json_safe({"test": {"auc": float("nan"), "count": 3.0}})
        ({'test': {'auc': None, 'count': 3.0}}, ['test.auc'])
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path]
    if isinstance(value, dict):
        out, paths = {}, []
        for k, v in value.items():
            out[k], sub = json_safe(v, f"{path}.{k}" if path else str(k))
            paths += sub
        return out, paths
    if isinstance(value, (list, tuple)):
        items, paths = [], []
        for i, v in enumerate(value):
            item, sub = json_safe(v, f"{path}[{i}]")
            items.append(item)
            paths += sub
        return items, paths
    return value, []


def write_json(path: Path, value: Any) -> list[str]:
    """Write ``value`` as strict JSON (NaN and infinities as ``null``) through a temporary file; returns the paths
    written as ``null`` that were not-a-number."""
    safe, paths = json_safe(value)
    with atomic_output(path) as part:
        part.write_text(json.dumps(safe, indent=2, allow_nan=False) + "\n")
    return paths


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a reader never sees half a file."""
    with atomic_output(path) as part:
        part.write_text(text)


def check_output_dir(out: str | Path, key: str) -> Path:
    """``out`` as a directory to write into: refused when it is a file (or lies under one)."""
    path = Path(out)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"lies under {candidate}, a file"
                raise ConfigError(f"{key}: {path} {what}; name a directory")
            break
    return path


__all__ = ["atomic_output", "check_output", "check_output_dir", "json_safe", "write_json"]
