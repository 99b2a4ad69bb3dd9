"""The inference artifact on disk: files, manifest and checksums (torch, json and hashlib only).

Layout of an artifact directory (written by :func:`supermoe_rec.serving.export_artifact.export_artifact`)::

    manifest.json     format, source run + checkpoint step, the run's config, the schema (features, tables with
                      their row counts / hashing / vocabularies, tasks, max_history), how the table-free part is
                      stored and why, and the size and SHA-256 of every other file
    tables.pt         the embedding tables as plain full tensors, {table name: [rows, D]} (sharded tables gathered)
    over_arch.pt      the table-free part (encoder + towers) as a state_dict of plain tensors
    item_catalog.pt   the item-side features of every candidate item row, as jagged (values, offsets) tensors
    vocab.json        the run's vocabularies (only when the schema has ``vocab: true`` tables)

Every ``.pt`` file holds tensors only and is read with ``torch.load(weights_only=True)``. :func:`verify` checks the
manifest's checksums before anything is loaded; a missing, resized or changed file is an :class:`ArtifactError`
naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from supermoe_rec.data.errors import DataError

FORMAT = "supermoe_rec.artifact/1"
MANIFEST = "manifest.json"
TABLES = "tables.pt"
OVER_ARCH = "over_arch.pt"
ITEM_CATALOG = "item_catalog.pt"
VOCAB = "vocab.json"


class ArtifactError(DataError):
    """A missing, incomplete or corrupt artifact; the message names the artifact and the offending file.

    A :class:`~supermoe_rec.data.errors.DataError` (bad input: the CLI prints one line and exits 2).
    """

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.source, self.row, self.column = message, None, None


def inside(directory: Path, name: str) -> bool:
    """``directory / name`` is a path inside ``directory``: relative, no ``..`` out, no link leading out."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return False
    try:
        (directory / name).resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def artifact_id(directory: str | Path) -> str:
    """The SHA-256 of the artifact's manifest, which holds the SHA-256 of every file: one id per exported model."""
    return sha256(Path(directory) / MANIFEST)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` of a flat {name: tensor} dict, contiguous CPU copies (no views of larger storages)."""
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_tensors` (``weights_only=True``: tensors, never code).

    A file that is not such a dict (a pickle naming a class or callable, say) is an :class:`ArtifactError`."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ArtifactError(
            f"{path}: not a file of tensors; refused to load it ({type(exc).__name__}: {reason})"
        ) from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ArtifactError(f"{path}: expected a dict of tensors")
    return loaded


def write_manifest(directory: Path, manifest: Mapping[str, Any], files: list[str]) -> Path:
    """Add the size and SHA-256 of ``files`` (names inside ``directory``) and write ``manifest.json`` last.

    The manifest is written to a temporary name and renamed, so a directory with a manifest is a complete one.
    """
    body = dict(manifest)
    body["format"] = FORMAT
    body["files"] = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)} for name in files
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory; a clear :class:`ArtifactError` when it is absent or unreadable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory not found")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: {MANIFEST} is missing (not an artifact, or its export did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: the manifest lists no files")
    return manifest


def verify(directory: str | Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check every file the manifest lists: present, with its recorded size and SHA-256.

    Returns:
        the manifest.

    Raises:
        ArtifactError: naming the first missing, resized or changed file.
    """
    directory = Path(directory)
    body = dict(manifest) if manifest is not None else read_manifest(directory)
    for name in body["files"]:  # before any file is touched: nothing outside the artifact is read or measured
        if not inside(directory, name):
            raise ArtifactError(f"{directory}: the manifest lists {name!r}, a path outside the artifact")
    for name, entry in sorted(body["files"].items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: artifact file {name} is missing")
        size = path.stat().st_size
        if size != int(entry["bytes"]):
            raise ArtifactError(
                f"{directory}: artifact file {name} has {size} bytes, the manifest says {entry['bytes']} "
                "(truncated or replaced)"
            )
        if sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{directory}: artifact file {name} fails its SHA-256 check (changed since export)")
    return body


def artifact_bytes(directory: str | Path) -> int:
    """Bytes on disk of the manifest and every file it lists."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return (directory / MANIFEST).stat().st_size + sum(int(e["bytes"]) for e in manifest["files"].values())


__all__ = [
    "ITEM_CATALOG",
    "MANIFEST",
    "OVER_ARCH",
    "TABLES",
    "VOCAB",
    "ArtifactError",
    "artifact_bytes",
    "artifact_id",
    "inside",
    "load_tensors",
    "read_manifest",
    "save_tensors",
    "sha256",
    "verify",
    "write_manifest",
]
