"""The project's own errors as one line on stderr and a documented exit code; tracebacks only when asked for.

=========  =====================================================================================================
exit code  meaning
=========  =====================================================================================================
0          success
1          a run of ``compare`` / ``ablate`` failed (:class:`~supermoe_rec.studies.executor.RunError`)
2          bad config, bad input data, or a refused request (:class:`~supermoe_rec.config.experiment.ConfigError`,
           :class:`~supermoe_rec.data.errors.DataError`): changed-shape resume, a locked run dir, an unsafe name
3          an unusable checkpoint (:class:`~supermoe_rec.training.checkpoint.CheckpointError`): missing, damaged
130        interrupted (Ctrl-C): one line says what was saved and how to go on
=========  =====================================================================================================

Anything else is a bug and keeps its traceback. ``--debug`` (any command) or ``SUPERMOE_REC_DEBUG=1`` prints the
traceback of the project's errors too, before the one-line message.

Example::

    >>> from supermoe_rec.config.experiment import ConfigError
    >>> exit_code(ConfigError("model.d_model: must be positive"))
    2
    >>> exit_code(KeyError("a bug")) is None
    True
    >>> one_line(ValueError("not valid YAML:\\n  in line 3\\n    here"))
    'not valid YAML: in line 3 here'
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from supermoe_rec.config.experiment import ConfigError
from supermoe_rec.data.errors import DataError

DEBUG_ENV = "SUPERMOE_REC_DEBUG"
EXIT_FAILED_RUN = 1
EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT = 3
EXIT_INTERRUPTED = 130
# (module, class, exit code) of the errors of modules that import torch.
_LAZY_ERRORS = (
    ("supermoe_rec.training.checkpoint", "CheckpointError", EXIT_CHECKPOINT),
    ("supermoe_rec.studies.executor", "RunError", EXIT_FAILED_RUN),
    (
        "supermoe_rec.studies.compare",
        "CompareError",
        EXIT_FAILED_RUN,
    ),  # its name before the executor had its own module
)


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` was given, or the environment variable ``SUPERMOE_REC_DEBUG`` is set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of one of the project's errors; ``None`` for anything else (a bug: re-raise it)."""
    if isinstance(exc, (ConfigError, DataError)):
        return EXIT_BAD_INPUT
    # Only modules already imported can have raised their errors; importing them here would load torch for nothing.
    for module, name, code in _LAZY_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The message on one line (YAML parser errors, for one, span several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _label(code: int) -> str:
    return "checkpoint error" if code == EXIT_CHECKPOINT else "error"


def run_reporting(fn: Callable[[], int], debug: bool = False, on_interrupt: Callable[[], str] | None = None) -> int:
    """``fn()``, with the project's errors printed as ``supermoe-rec: error: <one line>`` and mapped to exit codes.

    Ctrl-C (``KeyboardInterrupt``) prints ``supermoe-rec: interrupted: <what was kept>`` (``on_interrupt()``: what
    was saved and how to go on) and exits 130, the shell's code for SIGINT; ``--debug`` adds the traceback.
    """
    try:
        return fn()
    except KeyboardInterrupt:
        if debug_enabled(debug):
            traceback.print_exc(file=sys.stderr)
        note = "stopped before finishing"
        if on_interrupt is not None:
            try:
                note = on_interrupt()
            except Exception as exc:  # the note is a courtesy: never a second traceback
                note = f"stopped before finishing ({type(exc).__name__} while looking at what was saved)"
        # On a fresh line: the terminal's ^C, or a progress bar, holds the current one.
        print(f"\nsupermoe-rec: interrupted: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        if debug_enabled(debug):
            traceback.print_exc(file=sys.stderr)
        print(f"supermoe-rec: {_label(code)}: {one_line(exc)}", file=sys.stderr)
        return code


__all__ = ["DEBUG_ENV", "EXIT_INTERRUPTED", "debug_enabled", "exit_code", "one_line", "run_reporting"]
