# torchx parses component signatures from the source (AST) and accepts only the typing spellings
# Optional/Dict/List, so this file keeps them (and no `from __future__ import annotations`).
# ruff: noqa: UP006, UP035, UP045
"""torchx components for supermoe_rec: launch the trainer on any torchx scheduler.

The ``train`` component is torchx's ``dist.ddp`` (one role, ``nnodes`` replicas, each a torchrun agent that starts
``nproc_per_node`` workers) running ``python -m supermoe_rec.training.trainer``. Everything after ``--`` goes to the
trainer::

    # from the repo root, on this machine: 1 host x 2 processes, or 2 "hosts" x 1 process
    .venv/bin/torchx run -s local_cwd supermoe_rec/training/components.py:train -j 1x2 -- --config configs/ml100k.yaml
    .venv/bin/torchx run -s local_cwd supermoe_rec/training/components.py:train -j 2x1 -- --config configs/ml100k.yaml

    # a cluster (examples): 2 hosts x 8 GPUs
    torchx run -s slurm supermoe_rec/training/components.py:train -j 2x8 --gpu 8 -- --config configs/ml100k.yaml

Which Python runs torchrun: ``dist.ddp`` calls ``torchrun`` from ``PATH``, so ``.venv/bin/torchx`` without an
activated venv fails locally with ``torchrun: command not found``. This component instead runs
``$SUPERMOE_PYTHON -m torch.distributed.run`` if that variable is set, else ``.venv/bin/python`` when the working
directory has one (``local_cwd`` runs in the repo root), else ``python`` from ``PATH`` (a container image).
torchrun starts its workers with its own interpreter, so the whole job uses that Python.
"""

from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp

TRAIN_MODULE = "supermoe_rec.training.trainer"

# Shell prelude that picks the interpreter (see the module docstring). ``$$`` is torchx's escape for a literal ``$``
# (role args go through string.Template macro substitution on every scheduler).
_PICK_PYTHON = (
    'PY="$${SUPERMOE_PYTHON:-}"; '
    'if [ -z "$$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi; fi; '
)


def train(
    *script_args: str,
    j: str = "1x2",
    cpu: int = 8,
    memMB: int = 16384,
    gpu: int = 0,
    h: Optional[str] = None,
    name: str = "supermoe-train",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    image: str = torchx.IMAGE,
) -> specs.AppDef:
    """
    Train supermoe_rec (``python -m supermoe_rec.training.trainer``) with torchrun on nnodes x nproc_per_node processes.

    Built on ``dist.ddp``: each replica (host) runs one torchrun agent; the workers get RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT, and the trainer joins the process group from them (gloo on CPU, nccl on GPU).
    The sharding planner plans for the whole world size.

    Args:
        script_args: trainer arguments, e.g. ``--config configs/ml100k.yaml --train.max_steps=100``
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one host, two processes) or 2x8 (two hosts, eight GPUs each)
        cpu: number of cpus per replica (host)
        memMB: cpu memory in MB per replica (host)
        gpu: number of gpus per replica (host); nproc_per_node must not exceed it on GPU hosts
        h: a registered named resource; if given it takes precedence over cpu, gpu and memMB
        name: job name, ``{experimentname}/{runname}`` or ``{runname}``
        env: environment variables for the workers (e.g. OMP_NUM_THREADS=1,SUPERMOE_PYTHON=python3)
        max_retries: the number of scheduler retries allowed
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-host only; one host picks a free port)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data)
        image: container image with supermoe_rec and its CPU or CUDA stack installed (ignored by local_cwd)
    """
    app = ddp(
        *script_args,
        m=TRAIN_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=dict(env) if env else {},
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    for role in app.roles:
        role.name = "train"  # dist.ddp names the role after the module's last part ("trainer"); keep the job's name
        shell, command = role.args
        if shell != "-c" or not command.startswith("torchrun "):
            raise RuntimeError(f"unexpected dist.ddp command {role.args!r}; torchx changed its ddp component")
        role.args = ["-c", _PICK_PYTHON + 'exec "$$PY" -m torch.distributed.run ' + command[len("torchrun ") :]]
    return app
