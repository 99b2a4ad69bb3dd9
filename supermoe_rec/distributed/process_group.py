"""The process group every job joins: :func:`init_distributed` and the :class:`DistContext` it returns.

Under ``torchrun`` / ``torchx`` the launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; a plain single process (``python -m supermoe_rec.training.trainer``, a notebook, the export and
probe jobs) gets a world of one on a free local port. The backend is gloo on CPU and nccl on GPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from supermoe_rec.config.base import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the world: its rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device_name: str) -> DistContext:
    """Join (or, for a plain single process, create) the process group: gloo on CPU, nccl on GPU.

    ``device_name`` is ``train.device``: ``"auto"`` (a GPU when one is visible), ``"cpu"`` or ``"cuda"``.
    """
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {device_name!r} is not one of ['auto', 'cpu', 'cuda']")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no GPU is visible")
    if "RANK" not in os.environ:  # a plain single process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


__all__ = ["DistContext", "init_distributed"]
