"""Atomic, resumable, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<run>/checkpoints/``::

    ckpt-000120-last/        one DCP checkpoint: sharded embeddings (and experts), dense weights, optimizer states
        rank0.pt, rank1.pt   per-rank extras: data position and RNG states (loaded with weights_only=True)
        config.yaml          the resolved config of the run
        COMPLETE             written last, by rank 0, after every rank finished writing
    LATEST, BEST             pointer files naming a checkpoint dir; replaced atomically (write + os.replace)

A crash mid-save leaves a dir without COMPLETE, which nothing points to: the previous checkpoint stays the one that
loads. Loading a missing, incomplete or corrupt checkpoint raises :class:`CheckpointError` naming the path; it never
silently starts from scratch. DCP reshards on load, so a checkpoint written by N ranks loads on M ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from supermoe_rec.config import ExperimentConfig, save_config

if TYPE_CHECKING:
    from supermoe_rec.train import Trainer

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    """Save and load the training state of a :class:`Trainer` (all ranks call every method)."""

    def __init__(self, root: Path, cfg: ExperimentConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg

    # ------------------------------------------------------------------------------------------------- save

    def _model_state(self, trainer: Trainer) -> dict[str, Any]:
        return {"model": trainer.dmp.state_dict(), "optim": trainer.optimizer.state_dict()}

    def save(self, trainer: Trainer, state: dict[str, Any], tag: str) -> Path:
        """Write a checkpoint of the current step; ``tag`` 'best' also moves the BEST pointer."""
        rank = dist.get_rank()
        name = f"ckpt-{state['step']:06d}-{tag}"
        path = self.root / name
        if rank == 0:
            if path.exists():  # a leftover of a crashed save of this very step: never pointed to
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        dcp_save(self._model_state(trainer), checkpoint_id=str(path))
        extras = {
            "state": json.dumps(state),
            "world_size": dist.get_world_size(),
            "torch_rng": torch.get_rng_state(),
            "loader": json.dumps(trainer.loaders["train"].state_dict()),
        }
        torch.save(extras, path / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            save_config(self.cfg, path / "config.yaml")
            (path / "COMPLETE").write_text("ok\n")
            _write_atomic(self.root / "LATEST", name)
            if tag == "best":
                _write_atomic(self.root / "BEST", name)
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        keep = {self._pointer("LATEST"), self._pointer("BEST")}
        for child in self.root.glob("ckpt-*"):
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def _pointer(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text().strip() if path.is_file() else None

    # ------------------------------------------------------------------------------------------------- load

    def _resolve(self, pointer: str) -> Path:
        target = self._pointer(pointer)
        if target is None:
            raise CheckpointError(f"{self.root}: no checkpoint to resume from ({pointer} is missing)")
        path = self.root / target
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"{path}: checkpoint is incomplete (no COMPLETE marker); it cannot be resumed")
        return path

    def load(self, trainer: Trainer, state: dict[str, Any]) -> dict[str, Any]:
        """Restore weights, optimizer states, data position and RNG from LATEST; returns the training state."""
        path = self._resolve("LATEST")
        # Optimizer states must exist before DCP can fill them in place.
        trainer.optimizer.init_state()
        target = self._model_state(trainer)
        try:
            dcp_load(target, checkpoint_id=str(path))
        except Exception as exc:  # DCP raises many types for truncated or corrupt files
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
        trainer.dmp.load_state_dict(target["model"])
        trainer.optimizer.load_state_dict(target["optim"])
        rank = dist.get_rank()
        extras_path = path / f"rank{rank}.pt"
        if not extras_path.is_file():
            extras_path = path / "rank0.pt"  # fewer ranks now than when saved: rank 0's position is global
        try:
            extras = torch.load(extras_path, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{extras_path}: cannot read ({type(exc).__name__}: {exc})") from exc
        restored: dict[str, Any] = json.loads(extras["state"])
        torch.set_rng_state(extras["torch_rng"])
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
        return restored

    def restore_weights(self, trainer: Trainer, tag: str = "best") -> None:
        """Load only the model weights of the BEST (or LATEST) checkpoint, e.g. before testing."""
        path = self._resolve("BEST" if tag == "best" else "LATEST")
        target = {"model": trainer.dmp.state_dict()}
        try:
            dcp_load(target, checkpoint_id=str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
        trainer.dmp.load_state_dict(target["model"])
