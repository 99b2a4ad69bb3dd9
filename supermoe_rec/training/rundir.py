"""A run dir belongs to one run at a time: ``train.name`` is one safe path component, and a lock file guards the dir.

``<train.out_dir>/<train.name>/LOCK`` is held with ``fcntl.flock`` (exclusive, non-blocking) by rank 0 for the whole
run and holds ``<pid> <host>`` of the holder. A second run on the same dir fails at once with a
:class:`RunDirLocked` naming that pid. The kernel drops a flock when its process dies, however it dies, so the
LOCK file a killed run leaves behind is stale: the next run takes it over (and says so). On release the file is
removed, so a finished run leaves its dir as it was.

Example::

    >>> check_run_name("ml100k-supermoe")
    >>> check_run_name("../escape")
    Traceback (most recent call last):
    ...
    supermoe_rec.config.base.ConfigError: train.name: '../escape' must be one path component ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from supermoe_rec.config.experiment import ConfigError, ExperimentConfig, check_run_name, to_dict
from supermoe_rec.training.resume import Change, check_resume

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"


class RunDirLocked(ConfigError):
    """Another live process holds the run dir's lock (exit code 2, like every refused request)."""


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text


def _describe(holder: str) -> str:
    pid, _, host = holder.partition(" ")
    if not pid:
        return "a process that has not written its pid yet"
    return f"pid {pid}" + (f" on {host}" if host else "")


def check_directory(path: Path, what: str = "the run dir") -> None:
    """``path`` and its existing ancestors are directories (a file in the way is a :class:`ConfigError`)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (for {path})"
                raise ConfigError(
                    f"{candidate}: is a file, not a directory{where}; {what} must be a directory: move the file, or "
                    "choose another train.out_dir or train.name"
                )
            return


def check_writable(run_dir: Path) -> None:
    """Before training: the run dir and its ``checkpoints`` are directories that a file can be written in (probed
    by creating and removing one), so a run never trains for hours and then fails at its first save."""
    checkpoints = run_dir / "checkpoints"
    check_directory(checkpoints, "the checkpoints entry")
    for directory in (run_dir, checkpoints):
        if not directory.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"{directory}: not writable ({exc.strerror or exc}); the run writes its config, checkpoints and "
                "metrics there"
            ) from exc


class RunDirLock:
    """Exclusive lock of a run dir (creates the dir; removes what it created on release if that stayed empty).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, RunDirLock(Path(tmp) / "run"):
        ...     try:
        ...         RunDirLock(Path(tmp) / "run").acquire()
        ...     except RunDirLocked as exc:
        ...         print("locked:", "pid" in str(exc))
        locked: True
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        # What a stale lock file held when it was taken over ("" if there was none).
        self.took_over = ""
        self._created: list[Path] = []

    def acquire(self) -> RunDirLock:
        self._created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]  # deepest first
        check_directory(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.run_dir}: cannot create the run dir ({exc.strerror or exc})") from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self.release()
                raise ConfigError(f"{self.path}: cannot create the run dir's lock ({exc.strerror or exc})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{self.path}: cannot lock the run dir: {exc.strerror}") from exc
                raise RunDirLocked(
                    f"{self.run_dir}: the run dir is in use by another run ({_describe(holder)}, lock {self.path}); "
                    "wait for it to finish, or choose another train.name"
                ) from None
            # The previous holder removes the file on release: if it did so between our open and our flock, we
            # hold a lock on a file nobody else can see. Try again on the one at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.took_over = _read_holder(fd)
        if self.took_over:
            log.warning("%s: took over a stale lock (%s is gone)", self.path, _describe(self.took_over))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: a waiting opener then retries on a fresh file
        os.close(self._fd)
        self._fd = None
        # A run refused before writing anything leaves no empty dirs behind (a dir with outputs stays).
        for created in self._created:
            try:
                created.rmdir()
            except OSError:
                break

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# What makes a run dir hold a run that a fresh start would destroy (the first save prunes every old checkpoint).
RUN_OUTPUTS = ("checkpoints/LATEST", "checkpoints/BEST", "metrics.json")


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """A run started from scratch in ``run_dir``: refused when the dir holds a run, unless ``overwrite``, which
    removes that run's checkpoints and metrics first (so nothing of it can be mistaken for the new run's)."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{run_dir}: train.name {run_dir.name!r} already holds a run ({', '.join(found)}); continue it with "
            "--train.resume=true, choose another --train.name, or replace it with --train.overwrite=true"
        )
    log.warning("%s: train.overwrite: replacing the run in it (%s)", run_dir, ", ".join(found))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.json", "plan.txt"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


@dataclass
class RunGuard:
    """What :func:`guard_run` holds for a run: rank 0's lock, and the hyper-parameter changes a resume accepted."""

    lock: RunDirLock | None
    changes: list[Change] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def guard_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    is_main: bool,
    saved_config: Callable[[], tuple[Mapping[str, Any], str]],
) -> RunGuard:
    """Before a run writes anything: rank 0 locks ``run_dir`` and, on resume, checks the config against the one the
    checkpoint was saved with (``saved_config()``: that mapping and the file it came from).

    Collective when a process group is up: every rank raises the same error (a :class:`ConfigError`, or the
    checkpoint module's ``CheckpointError`` for a checkpoint that cannot be read), so no rank runs on alone.
    """
    import torch.distributed as dist

    from supermoe_rec.training.checkpoint import CheckpointError

    guard = RunGuard(lock=None)
    error: tuple[str, str] | None = None
    if is_main:
        try:
            guard.lock = RunDirLock(run_dir).acquire()
            check_writable(run_dir)
            if not cfg.train.resume:
                check_fresh_start(run_dir, cfg.train.overwrite)
            if cfg.train.resume:
                old, source = saved_config()
                guard.changes = check_resume(old, to_dict(cfg), cfg.train.resume_allow_changes, source)
                for change in guard.changes:
                    log.warning("resume: accepted change %s", change.text())
        except ConfigError as exc:
            error = ("config", str(exc))
        except CheckpointError as exc:
            error = ("checkpoint", str(exc))
        if error is not None:
            guard.release()
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[tuple[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, error)
        error = next((e for e in gathered if e is not None), None)
    if error is not None:
        kind, message = error
        raise CheckpointError(message) if kind == "checkpoint" else ConfigError(message)
    return guard


__all__ = [
    "LOCK_FILE",
    "RUN_OUTPUTS",
    "RunDirLock",
    "RunDirLocked",
    "RunGuard",
    "check_fresh_start",
    "check_run_name",
    "guard_run",
]
