"""Real launches of the trainer through torchx's local scheduler (``local_cwd``) on CPU: 2 ranks, tiny settings.

Each test runs the ``torchx`` CLI that sits next to this interpreter, from the repo root, with torchx's log dir and
``TMPDIR`` under ``tmp_path``, and checks the job SUCCEEDED and that ``metrics.json`` holds a world of two with
test metrics for every task. MovieLens-100k comes from the default cache (``~/.cache/supermoe_rec``, filled by the
``ml100k`` fixture of conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from supermoe_rec.data.movielens import MovieLens

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
TORCHX = BIN_DIR / "torchx"
TIMEOUT_S = 300  # one run takes 15-40 s on 2 idle cores; the margin is for a busy machine
TINY = (
    "--config",
    "configs/ml100k.yaml",
    "--train.max_steps=4",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
)
PRIMARY = {"watch": "auc", "like": "auc", "rating": "rmse"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _without_bin_dir(path: str) -> str:
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != BIN_DIR.resolve())


def _launch(
    tmp_path: Path,
    component: Sequence[str],
    name: str,
    env: dict[str, str] | None = None,
    unset: Sequence[str] = (),
) -> tuple[dict[str, Any], Path, str]:
    """``torchx run -s local_cwd <component...> -- <tiny trainer args>``; returns (metrics, app log dir, output)."""
    out_dir, log_dir, tmp = tmp_path / "runs", tmp_path / "torchx", tmp_path / "tmp"
    tmp.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k not in unset}
    run_env.update(TMPDIR=str(tmp), **(env or {}))
    cmd = [
        str(TORCHX),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={log_dir}",
        *component,
        "--",
        *TINY,
        f"--train.out_dir={out_dir}",
        f"--train.name={name}",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S
    )
    output = proc.stdout
    why = f"$ {' '.join(cmd)}\n(exit {proc.returncode} after {time.monotonic() - start:.0f} s)\n{output[-6000:]}"
    assert proc.returncode == 0, why
    assert "Job finished: SUCCEEDED" in output, why
    handle = re.search(r"local_cwd://torchx/(\S+)", output)
    assert handle is not None, why
    app_log_dir = log_dir / "torchx" / handle.group(1)
    assert app_log_dir.is_dir(), why
    metrics_file = out_dir / name / "metrics.json"
    assert metrics_file.is_file(), why
    return json.loads(metrics_file.read_text()), app_log_dir, why


def _check_metrics(metrics: dict[str, Any], why: str) -> None:
    assert metrics["world_size"] == 2, why
    assert metrics["steps"] == 4, why
    tasks = metrics["test"]["tasks"]
    assert set(tasks) == set(PRIMARY), why
    for task, metric in PRIMARY.items():
        value = tasks[task][metric]
        assert isinstance(value, float) and value == value and value > 0, f"{task}.{metric}={value}\n{why}"
        assert tasks[task]["count"] > 0, why


def _replicas(app_log_dir: Path, role: str = "train") -> list[str]:
    """The replica (torchrun agent, i.e. "host") log dirs torchx made for ``role`` (our component's is ``train``)."""
    return sorted(p.name for p in (app_log_dir / role).iterdir() if p.is_dir())


@pytest.fixture(autouse=True)
def _data_cached(ml100k: MovieLens) -> None:
    """Fetch MovieLens-100k into the default cache once, before any launch reads it."""


def test_component_1x2_uses_repo_venv_without_path(tmp_path: Path) -> None:
    """One host x two processes. The venv is NOT on PATH: the component must still find .venv/bin/python."""
    env = {"PATH": _without_bin_dir(os.environ.get("PATH", ""))}
    if BIN_DIR.resolve() != (REPO_ROOT / ".venv" / "bin").resolve():
        env["SUPERMOE_PYTHON"] = sys.executable  # not the repo's .venv: name this interpreter explicitly
    component = ["supermoe_rec/training/components.py:train", "-j", "1x2"]
    metrics, app_log_dir, why = _launch(tmp_path, component, "c1x2", env, unset=["SUPERMOE_PYTHON"])
    _check_metrics(metrics, why)
    assert _replicas(app_log_dir) == ["0"], why


@pytest.mark.slow
def test_component_2x1_two_hosts(tmp_path: Path) -> None:
    """Two "hosts" (two torchrun agents, GROUP_RANK 0 and 1) x one process, rendezvous on a free port."""
    component = ["supermoe_rec/training/components.py:train", "-j", "2x1", "--rdzv_port", str(_free_port())]
    env = {"SUPERMOE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    metrics, app_log_dir, why = _launch(tmp_path, component, "c2x1", env)
    _check_metrics(metrics, why)
    assert _replicas(app_log_dir) == ["0", "1"], why


@pytest.mark.slow
def test_stock_dist_ddp_module(tmp_path: Path) -> None:
    """torchx's own ``dist.ddp -m supermoe_rec.training.trainer``: it calls ``torchrun`` from PATH, so the venv goes
    first."""
    env = {"PATH": os.pathsep.join([str(BIN_DIR), os.environ.get("PATH", "")])}
    component = ["dist.ddp", "-j", "1x2", "-m", "supermoe_rec.training.trainer"]
    metrics, app_log_dir, why = _launch(tmp_path, component, "stock1x2", env)
    _check_metrics(metrics, why)
    assert _replicas(app_log_dir, role="trainer") == ["0"], why  # dist.ddp names the role after the module
