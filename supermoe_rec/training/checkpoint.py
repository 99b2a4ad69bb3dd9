"""Atomic, resumable, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<run>/checkpoints/``::

    ckpt-000120-last/        one DCP checkpoint: sharded embeddings and experts, dense weights, optimizer states
        .metadata, __<rank>_<n>.distcp   DCP's files
        rank0.pt, rank1.pt   per-rank extras: training state (data position), RNG states (loaded weights_only)
        config.yaml          the resolved config of the run
        vocab.json           the run's vocabularies, when the schema has vocab tables (docs/data.md)
        data.json            what the run trains on: per split, its file, rows and a SHA-256 of the rows read
        COMPLETE             written last (atomically, by rank 0) once every rank finished: a JSON manifest with
                             the size and CRC-32 of every other file
    LATEST, BEST             pointer files naming a checkpoint dir; replaced atomically (write, fsync, rename)

A crash mid-save leaves a dir without COMPLETE, which no pointer names: the previous checkpoint stays the one that
loads (the leftover is deleted by the next save). A save never rewrites the dir a pointer names, so there is no
moment without a loadable checkpoint. Loading a missing, incomplete, truncated or corrupt checkpoint raises
:class:`CheckpointError` naming the path on *every* rank (ranks agree before going on, so none runs ahead into a
collective alone); it never silently starts from scratch. DCP reshards on load, so a checkpoint written by N ranks
loads on M ranks.

What is saved is a :class:`TrainState`, a DCP ``Stateful`` over the run's (DMP-wrapped) model, its optimizer (none:
weights only, as export restores them), its device and its train loader; the manager never sees the trainer. The
data position is ``state["batches_done"]``: batches *trained* in the current epoch. The train pipeline prefetches,
so the loader's own cursor runs ahead and is not the position to resume from.

Expert-parallel experts (:class:`~supermoe_rec.distributed.expert_parallel.ExpertParallelExperts`) hold a
different slice of the ``[E, ...]`` weights on each rank under one name; :class:`TrainState` saves them (and their
optimizer states) as ``DTensor`` sharded on dim 0, so DCP stores every rank's slice and reshards them on load.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.optim.keyed import KeyedOptimizer

from supermoe_rec.config.experiment import ExperimentConfig, save_config
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.vocab import FILE_NAME as VOCAB_FILE
from supermoe_rec.data.vocab import Vocabulary, save_vocabularies
from supermoe_rec.distributed.expert_parallel import ExpertParallelExperts

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_FORMAT = 1
MARKER = "COMPLETE"
DATA_FILE = "data.json"
# Test hook: a save of this step kills its process (SIGKILL) after the checkpoint's files, before its COMPLETE.
KILL_IN_SAVE_ENV = "SUPERMOE_REC_TEST_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


# ----------------------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new file, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _digest(path: Path, sync: bool = False) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file; ``sync`` also flushes it to disk first."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _inside(root: Path, name: str) -> bool:
    """``root / name`` names a path inside ``root`` (no ``..``, no absolute path, no link leading out)."""
    try:
        (root / name).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return not Path(name).is_absolute()


def _agree(error: str | None) -> None:
    """Collective: raise the same :class:`CheckpointError` on every rank if any rank reports an error."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise CheckpointError(first)


def _agreed(what: str, fn: Callable[[], T]) -> T:
    """Collective: run ``fn`` on every rank; if it fails anywhere, raise the first failure on every rank."""
    error: str | None = None
    result: T | None = None
    try:
        result = fn()
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{what}: {type(exc).__name__}: {exc}"
    _agree(error)
    return result  # type: ignore[return-value]


# ------------------------------------------------------------------------------ reading DCP without running code

# What DCP's ``.metadata`` pickle may name: its own dataclasses, torch.Size, dtypes and layouts, a path. Anything
# else (``builtins.open``, ``os.system``, any callable a crafted file names) is refused before it is called.
_METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only :data:`_METADATA_GLOBALS` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(path: str | os.PathLike[str]) -> Metadata:
    """DCP's ``.metadata`` file at ``path``, unpickled by a reader that refuses every class DCP does not need.

    Raises:
        CheckpointError: the file names another class or callable (a crafted file: nothing of it ran), or it is not
            DCP metadata.
    """
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load the checkpoint's metadata: {exc}") from exc
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP checkpoint metadata (a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :func:`read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by ``torch.load(weights_only=True)`` (DCP's own loads them
    with ``weights_only=False``, which runs any code a crafted ``.distcp`` file holds)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"refused a value of the checkpoint ({read_item.dest_index.fqn}): {exc}") from exc
        safe = io.BytesIO()
        torch.save(obj, safe)  # what weights_only admitted: plain values and tensors, safe to hand on
        safe.seek(0)
        super().load_bytes(read_item, safe)


# ----------------------------------------------------------------------------------------- expert parallelism


def _shard0(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """This rank's slice ``t`` of a tensor sharded on dim 0 over ``mesh`` (no copy: DCP loads into ``t``)."""
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)


def _local(obj: Any) -> Any:
    """The state with every DTensor replaced by this rank's local tensor (what ``load_state_dict`` takes)."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    return obj


@dataclass
class TrainState:
    """A run's state as DCP saves and loads it: a ``torch.distributed.checkpoint.stateful.Stateful``.

    ``state_dict()`` is ``{"model": ..., "optim": ...}`` (``optim`` only with an optimizer): the sharded tables,
    experts and dense weights, and every optimizer state. Expert-parallel experts (and their optimizer states) are
    ``DTensor`` sharded on dim 0, so DCP stores every rank's slice and reshards them on load.

    Attributes:
        model: the DMP-wrapped (or plain) train module.
        optimizer: its optimizer; ``None`` holds the weights alone (restoring weights for evaluation or export).
        device: this rank's compute device (its RNG state is saved too when it is CUDA).
        loader: the train loader; its cursor is saved for information only (it runs ahead of training).
    """

    model: nn.Module
    optimizer: KeyedOptimizer | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loader: ShardedBatchLoader | None = None
    _meshes: dict[int, DeviceMesh] = field(default_factory=dict, repr=False)

    def weights(self) -> TrainState:
        """The same state without the optimizer."""
        return replace(self, optimizer=None)

    def _mesh(self, module: ExpertParallelExperts) -> DeviceMesh:
        group = module.group if module.group is not None else dist.group.WORLD
        assert group is not None
        if id(group) not in self._meshes:
            self._meshes[id(group)] = DeviceMesh.from_group(group, self.device.type)
        return self._meshes[id(group)]

    def state_dict(self) -> dict[str, Any]:
        """What DCP saves/loads: the model (sharded tables, experts, dense) and all optimizer states."""
        model = self.model.state_dict()
        optim = self.optimizer.state_dict() if self.optimizer is not None else {}
        root = get_unwrapped_module(self.model)
        for name, module in root.named_modules():
            if not isinstance(module, ExpertParallelExperts):
                continue
            mesh = self._mesh(module)
            for pname, param in module.named_parameters(recurse=False):
                key = f"{name}.{pname}" if name else pname
                if key in model:
                    model[key] = _shard0(model[key], mesh)
                states = optim.get("state", {})
                if key in states:  # a new dict: the optimizer's own state stays untouched
                    states[key] = {
                        k: _shard0(v, mesh) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                        for k, v in states[key].items()
                    }
        return {"model": model, "optim": optim} if self.optimizer is not None else {"model": model}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave (filled in by DCP) into the model and the optimizer."""
        self.model.load_state_dict(_local(state_dict["model"]))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(_local(state_dict["optim"]))


def load_failure(exc: BaseException) -> str:
    """One short line for a failed DCP load: the first failing rank's own error, not DCP's per-rank tracebacks; a
    size mismatch says the model no longer fits the checkpoint.

    Example::

        >>> from torch.distributed.checkpoint.api import _wrap_exception
        >>> try:
        ...     raise AssertionError("req item mismatch sizes torch.Size([10, 8]) vs torch.Size([12, 8])")
        ... except AssertionError as e:
        ...     failure = CheckpointException("load", {0: _wrap_exception(e)})
        >>> print(load_failure(failure))  # doctest: +ELLIPSIS
        rank 0: AssertionError: req item mismatch sizes ... vs torch.Size([12, 8]); the model built from this config ...
    """
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = next(iter(sorted(exc.failures.items())))
        text = f"rank {rank}: {type(inner).__name__}: {' '.join(str(inner).split())}"[:600]
        if "size" in text.lower() and "mismatch" in text.lower():
            text += (
                "; the model built from this config and data does not fit the checkpoint's shapes: the data (its item "
                "or user range) or the model settings changed since it was saved"
            )
        return text
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise the ``KeyboardInterrupt`` it would have raised.

    A save interrupted half-way leaves nothing to load from it (and DCP would wrap the interrupt into its own
    error); deferred, the save completes and the run stops right after it, with that checkpoint to resume from.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if received and callable(previous):
        previous(signal.SIGINT, None)


class CheckpointManager:
    """Save and load a :class:`TrainState` (all ranks call every method: they are collective)."""

    def __init__(
        self,
        root: Path,
        cfg: ExperimentConfig,
        vocabularies: Mapping[str, Vocabulary] | None = None,
        data_fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.cfg = cfg
        # The run's vocabularies (vocab tables, docs/data.md): every checkpoint keeps them next to config.yaml.
        self.vocabularies = dict(vocabularies or {})
        # What the run trains on (supermoe_rec.training.resume.data_fingerprint), saved as data.json: a resume on
        # other data is refused.
        self.data_fingerprint = dict(data_fingerprint) if data_fingerprint is not None else None

    # ------------------------------------------------------------------------------------------------- save

    def _pointer(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text().strip() if path.is_file() else None

    def _fresh_name(self, name: str) -> str:
        """``name``, or ``name.N`` when a pointer names ``name`` (re-saving a step must not touch the good copy)."""
        pointed = {self._pointer("LATEST"), self._pointer("BEST")}
        candidate, n = name, 0
        while candidate in pointed:
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def save(self, train_state: TrainState, state: dict[str, Any], tag: str) -> Path:
        """Write a checkpoint of the current step; ``tag`` 'best' also moves the BEST pointer.

        Ctrl-C during the save takes effect when it is complete (see :func:`_sigint_deferred`).

        Args:
            train_state: the model, optimizer, device and loader to save.
            state: the training counters (JSON-ready: epoch, step, batches_done, ...).
            tag: the checkpoint's tag (``step<N>``, ``last``, ``best``).
        """
        with _sigint_deferred():
            return self._save(train_state, state, tag)

    def _save(self, train_state: TrainState, state: dict[str, Any], tag: str) -> Path:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        names: list[str | None] = [self._fresh_name(f"ckpt-{state['step']:06d}-{tag}") if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        assert names[0] is not None
        path = self.root / names[0]
        if rank == 0:
            if path.exists():  # a leftover of a crashed save of this very step: never pointed to
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        dcp_save(train_state.state_dict(), checkpoint_id=str(path))
        extras: dict[str, Any] = {
            "state": json.dumps(state),
            "world_size": world_size,
            "torch_rng": torch.get_rng_state(),
        }
        if train_state.loader is not None:  # informational: the loader runs ahead (prefetch)
            extras["loader"] = json.dumps(train_state.loader.state_dict())
        if train_state.device.type == "cuda":
            extras["cuda_rng"] = torch.cuda.get_rng_state(train_state.device)
        torch.save(extras, path / f"rank{rank}.pt")
        if rank == 0:
            save_config(self.cfg, path / "config.yaml")
            if self.vocabularies:
                save_vocabularies(self.vocabularies, path / VOCAB_FILE)
            if self.data_fingerprint is not None:
                (path / DATA_FILE).write_text(json.dumps(self.data_fingerprint, indent=1) + "\n")
        dist.barrier()
        if os.environ.get(KILL_IN_SAVE_ENV) == str(state["step"]):  # tests only: die as SIGKILL does, mid-save
            os.kill(os.getpid(), signal.SIGKILL)
        # Every file is written: each rank flushes and fingerprints its share, rank 0 writes the manifest.
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        mine = {f: _digest(path / f, sync=True) for f in files[rank::world_size]}
        gathered: list[dict[str, tuple[int, int]] | None] = [None] * world_size
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            manifest: dict[str, Any] = {
                "format": MANIFEST_FORMAT,
                "step": state["step"],
                "epoch": state["epoch"],
                "world_size": world_size,
                "files": dict(sorted((f, list(d)) for part in gathered if part for f, d in part.items())),
            }
            _fsync_dir(path)
            _write_atomic(path / MARKER, json.dumps(manifest, indent=1) + "\n")
            _write_atomic(self.root / "LATEST", path.name)
            if tag == "best":
                _write_atomic(self.root / "BEST", path.name)
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        keep = {self._pointer("LATEST"), self._pointer("BEST")}
        for child in self.root.glob("ckpt-*"):
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- load

    def _resolve(self, pointer: str, purpose: str = "resume") -> Path:
        target = self._pointer(pointer)
        if target is None:
            if purpose == "resume":
                raise CheckpointError(
                    f"{self.root}: no checkpoint to resume from ({self.root / pointer} does not exist); "
                    "run without train.resume to start from scratch"
                )
            raise CheckpointError(
                f"{self.root}: no checkpoint to load the weights from ({self.root / pointer} does not exist): the "
                "run has not saved one yet; train it first (supermoe-rec train), or name a run that has"
            )
        if target in ("", ".", "..") or Path(target).name != target:
            raise CheckpointError(
                f"{self.root / pointer}: names {target!r}, which is not a checkpoint folder of {self.root} "
                "(a pointer holds one folder name)"
            )
        path = self.root / target
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint named by {self.root / pointer} does not exist")
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{path}: checkpoint is incomplete (no {MARKER} marker); it cannot be resumed")
        return path

    def _verify(self, path: Path) -> None:
        """This rank's share of the manifest check: every file present, with its recorded size and CRC-32."""
        text = (path / MARKER).read_text()
        if text.strip() == "ok":  # written before manifests existed
            log.warning("%s: no manifest in %s; the files are not verified", path, MARKER)
            return
        try:
            manifest = json.loads(text)
            files: dict[str, list[int]] = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable {MARKER} manifest ({type(exc).__name__}: {exc})") from exc
        if ".metadata" not in files:
            raise CheckpointError(f"{path}: the {MARKER} manifest lists no DCP .metadata")
        for name in files:
            if not _inside(path, name):
                raise CheckpointError(f"{path}: the {MARKER} manifest lists {name!r}, a path outside the checkpoint")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for name in sorted(files)[rank::world_size]:
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: checkpoint is corrupt: {name} is missing")
            size, crc = _digest(file)
            want_size, want_crc = files[name]
            if size != want_size:
                raise CheckpointError(
                    f"{path}: checkpoint is corrupt: {name} has {size} bytes, the manifest says {want_size} "
                    "(truncated or overwritten)"
                )
            if crc != want_crc:
                raise CheckpointError(f"{path}: checkpoint is corrupt: {name} fails its CRC-32 check")

    def _open(self, pointer: str, purpose: str = "resume") -> Path:
        """Collective: the verified checkpoint dir ``pointer`` names, or the same CheckpointError on every rank."""
        path = _agreed(f"{self.root / pointer}", lambda: self._resolve(pointer, purpose))
        _agreed(f"{path}: cannot verify checkpoint", lambda: self._verify(path))
        return path

    def _dcp_load(self, target: dict[str, Any], path: Path) -> None:
        # The metadata first, by this rank alone: a crafted one is refused with its own message (nothing of it runs).
        _agreed(f"{path}: cannot read the checkpoint's metadata", lambda: read_dcp_metadata(path / ".metadata"))
        try:  # DCP gathers every rank's failure and raises on all of them
            dcp_load(target, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        # DCP's CheckpointException (a mismatched model, for one) is a BaseException, not an Exception.
        except (Exception, CheckpointException) as exc:  # many types for unreadable files or mismatched models
            raise CheckpointError(f"{path}: cannot load checkpoint ({load_failure(exc)})") from exc

    def _checked_file(self, name: str) -> Path:
        """LATEST's checkpoint file ``name``, checked against its manifest entry (when listed and present)."""
        path = self._resolve("LATEST") / name
        try:  # a damaged file is a damaged checkpoint (exit 3), never a "changed config" or "changed data"
            text = (path.parent / MARKER).read_text()
            listed = None if text.strip() == "ok" else json.loads(text).get("files", {}).get(path.name)
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path.parent}: unreadable {MARKER} manifest ({type(exc).__name__})") from exc
        if listed is not None and path.is_file() and list(_digest(path)) != list(listed):
            raise CheckpointError(f"{path.parent}: checkpoint is corrupt: {path.name} fails its size/CRC-32 check")
        return path

    def saved_data_fingerprint(self) -> tuple[dict[str, Any] | None, str]:
        """The data fingerprint LATEST's checkpoint was saved with (``None`` when it predates them) and its file."""
        path = self._checked_file(DATA_FILE)
        if not path.is_file():
            log.warning("%s: no %s (saved before data fingerprints); the data are not compared", path.parent, DATA_FILE)
            return None, str(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: cannot read the checkpoint's data fingerprint ({type(exc).__name__})"
            ) from exc
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: the checkpoint's data fingerprint is not a mapping")
        return values, str(path)

    def saved_config(self) -> tuple[dict[str, Any], str]:
        """The config LATEST's checkpoint was saved with (a plain mapping) and its file; reads only, on this rank."""
        path = self._checked_file("config.yaml")
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(f"{path}: cannot read the checkpoint's config ({type(exc).__name__})") from exc
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: the checkpoint's config is not a mapping")
        return values, str(path)

    def load(self, train_state: TrainState, state: dict[str, Any]) -> dict[str, Any]:
        """Restore weights, optimizer states, data position and RNG from LATEST; returns the training state.

        ``state`` is the fresh-run state: keys the checkpoint lacks keep its values.
        """
        path = self._open("LATEST")
        if train_state.optimizer is not None:
            # Optimizer states must exist before DCP can fill them in place. The dummy step this takes may move
            # weights (weight decay): the load below overwrites every weight and state, and the zero grads it leaves
            # go too.
            train_state.optimizer.init_state()
            train_state.optimizer.zero_grad(set_to_none=True)
        target = train_state.state_dict()
        self._dcp_load(target, path)
        train_state.load_state_dict(target)

        rank = dist.get_rank()
        extras_path = path / f"rank{rank}.pt"
        if not extras_path.is_file():
            extras_path = path / "rank0.pt"  # more ranks now than when saved: rank 0's position is global

        def read_extras() -> dict[str, Any]:
            extras: dict[str, Any] = torch.load(extras_path, weights_only=True)
            return extras

        extras = _agreed(f"{extras_path}: cannot read", read_extras)
        restored: dict[str, Any] = {**state, **json.loads(extras["state"])}
        torch.set_rng_state(extras["torch_rng"])
        if "cuda_rng" in extras and train_state.device.type == "cuda":
            torch.cuda.set_rng_state(extras["cuda_rng"], train_state.device)
        if int(extras["world_size"]) != dist.get_world_size() and restored["batches_done"]:
            log.warning(
                "%s was written by %d rank(s), this run has %d: batches per epoch differ, so epoch %d restarts "
                "from its first batch (weights and optimizer states are restored exactly)",
                path,
                extras["world_size"],
                dist.get_world_size(),
                restored["epoch"],
            )
            restored["batches_done"] = 0
        log.info("loaded %s", path)
        return restored

    def restore_weights(self, train_state: TrainState, tag: str = "best") -> None:
        """Load only the model weights of the BEST (or LATEST) checkpoint, e.g. before testing or exporting."""
        path = self._open("BEST" if tag == "best" else "LATEST", purpose="weights")
        weights = train_state.weights()
        target = weights.state_dict()
        self._dcp_load(target, path)
        weights.load_state_dict(target)
