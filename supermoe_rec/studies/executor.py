"""Many training runs, each isolated: run specs, run keys, the job queue (shared by compare, ablate and scale).

A run is a :class:`RunSpec`: a resolved config and its key, the SHA-256 of what the run trains (:func:`config_key`).
:func:`make_run` names a run ``<arch>-<tasks>-seed<seed>-<key[:8]>``; :func:`execute` trains (or reuses) runs,
``jobs`` at a time, every one a plain :func:`supermoe_rec.training.trainer.train` call in a fresh ``spawn`` subprocess
(a world
of one, :func:`run_isolated`), so no process-group, RNG or fused-optimizer state carries from one run to the next. A
run whose ``metrics.json`` holds a config with the same key is reused (:func:`finished_metrics`) unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from supermoe_rec.config.experiment import (
    ARCH_SECTIONS,
    ARCH_SPECIFIC_SECTIONS,
    Arch,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    from_dict,
    to_dict,
)

log = logging.getLogger(__name__)

# train.* fields that say where a run's output goes, how it is logged or how fast it goes, not what it trains:
# excluded from the run's key.
_LOCATION_FIELDS = ("name", "out_dir", "num_threads", "tensorboard", "log_every")


# What an arch reads of the config beyond the shared sections is its own model sections (config.ARCH_SECTIONS): a
# run's key leaves out the other archs' sections, so tuning the encoder does not retrain the MLP baselines of a
# comparison, nor the MLP widths the transformer archs. The MoE loss weights belong to the archs with a moe section
# (the others return zero MoE losses, so the weights change nothing for them).
_MOE_LOSS_FIELDS = ("balance_loss_weight", "z_loss_weight")


# Environment of a launcher (torchrun, torchx); a compare run is always a world of one.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class RunError(RuntimeError):
    """A run failed or left unusable results; the message names the run and its log."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: its resolved config and the key (hash of that config, location excluded) naming it."""

    cfg: ExperimentConfig
    key: str

    @property
    def name(self) -> str:
        return self.cfg.train.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.data.tasks


def config_key(cfg: ExperimentConfig) -> str:
    """SHA-256 of the config's values that differ from the defaults, without the output-only ``train.*`` fields
    (name, out_dir, num_threads, tensorboard, log_every) and without the ``model`` sections of other archs than
    ``model.arch`` (:data:`~supermoe_rec.config.experiment.ARCH_SECTIONS`; without a ``moe`` section, the MoE loss
    weights
    ``train.loss.balance_loss_weight`` / ``z_loss_weight`` go too).

    Hashing only what differs from :class:`ExperimentConfig`'s defaults keeps keys, and so finished runs, valid when
    a new option is added with a default that keeps the old behaviour. A finished run is matched by re-keying its
    stored, complete config with today's defaults (:func:`finished_metrics`), so a changed default can never make
    an old run pass for a new one.

    Args:
        cfg: a resolved config.

    Returns:
        64 hex digits; equal for two configs that train the same model on the same data.
    """
    values, defaults = to_dict(cfg), to_dict(ExperimentConfig())
    for tree in (values, defaults):
        for name in _LOCATION_FIELDS:
            tree["train"].pop(name)
        own = ARCH_SECTIONS[cfg.model.arch]
        for section in ARCH_SPECIFIC_SECTIONS:
            if section not in own:
                tree["model"].pop(section)
        if "moe" not in own:
            for name in _MOE_LOSS_FIELDS:
                tree["train"]["loss"].pop(name)
    return hashlib.sha256(json.dumps(_non_default(values, defaults), sort_keys=True).encode()).hexdigest()


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of nested ``values`` that differ from ``defaults`` (a nested dict keeps only its differences)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        default = defaults.get(name)
        if isinstance(value, dict) and isinstance(default, dict):
            if nested := _non_default(value, default):
                out[name] = nested
        elif value != default:
            out[name] = value
    return out


def make_run(base: ExperimentConfig, arch: Arch, seed: int, tasks: tuple[str, ...], runs_dir: Path) -> RunSpec:
    """The run of ``arch`` on ``tasks`` with ``seed``, everything else as in ``base``.

    ``train.loss.task_weights`` keeps only the weights of the run's tasks: a single-task twin of a run that weighs
    ``watch`` 2 trains ``like`` exactly as a twin of an unweighted run does, and shares its key (and finished run).

    Args:
        base: the resolved base config (file + overrides).
        arch: the architecture.
        seed: ``train.seed``.
        tasks: ``data.tasks`` (empty: every task of the schema).
        runs_dir: ``train.out_dir`` of the run.

    Returns:
        the run, named ``<arch>-<tasks>-seed<seed>-<key[:8]>``.
    """
    cfg = replace(base, model=replace(base.model, arch=arch), data=replace(base.data, tasks=tasks))
    loss = replace(cfg.train.loss, task_weights=cfg.trained_task_weights())
    cfg = replace(cfg, train=replace(cfg.train, seed=seed, out_dir=str(runs_dir), loss=loss))
    key = config_key(cfg)
    label = "+".join(tasks) if tasks else "all"
    cfg = replace(cfg, train=replace(cfg.train, name=f"{arch.value}-{label}-seed{seed}-{key[:8]}"))
    return RunSpec(cfg, key)


def _metrics_path(spec: RunSpec) -> Path:
    return Path(spec.cfg.train.out_dir) / spec.name / "metrics.json"


def finished_metrics(spec: RunSpec) -> dict[str, Any] | None:
    """The metrics of a finished run of exactly this config, or None (absent, unreadable or another config).

    Args:
        spec: the run.

    Returns:
        the parsed ``metrics.json``, when it has test metrics and its config has ``spec``'s key.
    """
    path = _metrics_path(spec)
    try:
        metrics = json.loads(path.read_text())
        stored = load_config_dict(metrics["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "test" not in metrics or config_key(stored) != spec.key:
        return None
    assert isinstance(metrics, dict)
    return metrics


def load_config_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a stored mapping (``metrics.json``'s ``config``), strictly."""
    cfg: ExperimentConfig = from_dict(values, ExperimentConfig)
    return cfg


def _train_worker(cfg: ExperimentConfig, log_path: str) -> None:
    """Body of the spawned process: a world of one, output to the run's log, then :func:`train`."""
    for name in _LAUNCHER_ENV:
        os.environ.pop(name, None)  # a launcher's rank variables would make train() join the wrong group
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a") as f:
        # At the descriptor level, so C++ warnings and the run's progress bar land in the log too.
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
    import torch.distributed as dist

    from supermoe_rec.training.trainer import train

    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_isolated(spec: RunSpec, num_threads: int = 0) -> dict[str, Any]:
    """Train ``spec`` from scratch in a fresh spawned process and return its ``metrics.json``.

    Args:
        spec: the run; its directory is emptied first, so no stale checkpoint or metrics can leak in.
        num_threads: intra-op CPU threads of the run when its config leaves ``train.num_threads`` at 0 (0: torch's
            default, every core).

    Returns:
        the run's metrics.

    Raises:
        RunError: the run failed (the message names its log) or wrote no usable metrics.
    """
    run_dir = Path(spec.cfg.train.out_dir) / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    cfg = spec.cfg
    if num_threads and not cfg.train.num_threads:
        cfg = replace(cfg, train=replace(cfg.train, num_threads=num_threads))
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_train_worker, cfg, str(log_path)).result()
    except Exception as exc:
        raise RunError(f"run {spec.name} failed: {type(exc).__name__}: {exc} (log: {log_path})") from exc
    metrics = finished_metrics(spec)
    if metrics is None:
        raise RunError(f"run {spec.name} wrote no test metrics for its config (log: {log_path})")
    return metrics


def execute(
    runs: Sequence[RunSpec], force: bool = False, progress: bool = True, jobs: int = 1
) -> dict[str, tuple[dict[str, Any], bool]]:
    """Train (or reuse) every run, ``jobs`` at a time.

    Args:
        runs: unique runs.
        force: retrain even when a finished run of the same config exists.
        progress: show a progress bar over the runs.
        jobs: runs trained at once (≥ 1), each in its own process. With ``jobs > 1`` a run whose config leaves
            ``train.num_threads`` at 0 gets ``cpu_count // jobs`` threads, so the runs share the cores instead of
            fighting over them. Small models train more samples per second in total this way (two 1-thread
            runs against one 2-thread run: see README), but each run's own ``samples_per_s`` is lower.

    Returns:
        run key -> ``(metrics.json contents, reused)``.

    Raises:
        RunError: a run failed; the runs already started are finished first.
    """
    results: dict[str, tuple[dict[str, Any], bool]] = {}
    pending: list[RunSpec] = []
    for spec in runs:
        cached = None if force else finished_metrics(spec)
        if cached is not None:
            log.info("reusing %s", spec.name)
            results[spec.key] = (cached, True)
        else:
            pending.append(spec)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    with tqdm(total=len(runs), desc="runs", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        bar.update(len(results))
        # Threads only wait here; every run trains in its own spawned process.
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_train_logged, spec, threads): spec for spec in pending}
            try:
                for future in as_completed(futures):
                    spec = futures[future]
                    results[spec.key] = (future.result(), False)
                    bar.set_postfix_str(spec.name, refresh=False)
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # started runs finish, queued ones never start
                raise
    return results


def _train_logged(spec: RunSpec, num_threads: int) -> dict[str, Any]:
    log.info("training %s", spec.name)
    return run_isolated(spec, num_threads)


def read_test_metric(metrics: Mapping[str, Any], task: str, metric: str, run: str) -> float:
    """``metrics.json``'s test ``task.metric`` of ``run``, or a :class:`RunError` naming what is missing."""
    try:
        value = metrics["test"]["tasks"][task][metric]
        return float("nan") if value is None else float(value)  # null: not defined on the split (undefined_metrics)
    except KeyError as exc:
        raise RunError(f"run {run}: metrics.json has no test {task}.{metric}") from exc


def check_counts(seeds: int, jobs: int) -> None:
    """``--seeds`` and ``--jobs`` are at least 1, or a :class:`ConfigError` naming the flag."""
    if seeds < 1:
        raise ConfigError(f"--seeds: at least one seed is needed, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs: at least one, got {jobs}")


def runs_dir_of(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Where compare and ablate write their runs: ``train.out_dir`` when it is set to anything but the default
    (``runs``), else ``<out_dir>/runs`` next to the report.

    Example::

        >>> from supermoe_rec.config.experiment import apply_overrides
        >>> runs_dir_of(ExperimentConfig(), Path("reports/x")).as_posix()
        'reports/x/runs'
        >>> runs_dir_of(apply_overrides(ExperimentConfig(), ["--train.out_dir=/scratch/runs"]), Path("r")).as_posix()
        '/scratch/runs'
    """
    default = TrainConfig().out_dir
    return out_dir / "runs" if cfg.train.out_dir == default else Path(cfg.train.out_dir)


__all__ = [
    "RunError",
    "RunSpec",
    "check_counts",
    "config_key",
    "execute",
    "finished_metrics",
    "load_config_dict",
    "make_run",
    "read_test_metric",
    "run_isolated",
    "runs_dir_of",
]
