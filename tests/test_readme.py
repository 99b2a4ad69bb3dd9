"""README.md runs as written: every ```python block, and every cheap command of its ```bash blocks.

Python blocks run one by one, each in a fresh interpreter (this one, the .venv's) from the repository root.

**Which shell commands are cheap** (and so run here; the rule is :func:`is_cheap`). A command line (backslash
continuations joined) of a ```bash block runs when its program is this checkout's ``.venv/bin/...`` (leading
``VAR=value`` assignments allowed) and it is one of:

- a ``--help`` / ``-h`` invocation;
- ``supermoe-rec data summary`` without ``--data.source=table`` (that one reads the reader's own files);
- ``supermoe-rec plan`` (the sharding planner on a simulated topology: no training).

Everything else -- ``make``, ``train``, ``compare``, ``export``, torchx launches, cluster commands -- takes minutes
or a cluster and is covered by its own tests (tests/test_torchx.py, tests/test_examples.py, ...), not here.
tests/test_docs.py applies the same rule to the commands of ``docs/*.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, body)`` of every fenced block of ``language`` in README.md."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m[2]) for m in FENCE.finditer(text) if m[1] == language]


def command_lines(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def is_cheap(command: str) -> bool:
    """The rule of the module docstring."""
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens or not tokens[0].startswith(".venv/bin/"):
        return False
    if "--help" in tokens or "-h" in tokens:
        return True
    if Path(tokens[0]).name != "supermoe-rec":
        return False
    if tokens[1:3] == ["data", "summary"]:
        return "--data.source=table" not in tokens
    return tokens[1:2] == ["plan"]


PYTHON_BLOCKS = blocks("python")
CHEAP_COMMANDS = [(line, cmd) for line, body in blocks("bash") for cmd in command_lines(body) if is_cheap(cmd)]


def test_rule_selects_the_expected_commands() -> None:
    assert is_cheap(".venv/bin/supermoe-rec data summary --config configs/ml100k.yaml")
    assert is_cheap('PATH="$PWD/.venv/bin:$PATH" .venv/bin/python examples/torchrec_pipeline.py --help')
    assert is_cheap(".venv/bin/supermoe-rec plan --config configs/scale_1b.yaml --world-size 8")
    assert not is_cheap(".venv/bin/supermoe-rec train --config configs/ml100k.yaml")
    assert not is_cheap(".venv/bin/supermoe-rec data summary --config c.yaml --data.source=table --data.table=t.csv")
    assert not is_cheap("torchx run -s slurm supermoe_rec/training/components.py:train -j 2x8 --gpu 8")
    assert not is_cheap("make demo   # main job")
    assert len(PYTHON_BLOCKS) >= 1, "README lost its Python quickstart"


def test_readme_is_a_front_door() -> None:
    """The README stays short: the pitch, the two commands, the diagram, one results table, the quickstart and
    links; the manual is docs/ (tests/test_docs.py runs its commands and Python blocks the same way)."""
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 10_000, f"README.md has {len(text):,} characters; move detail into docs/"
    (_, first), *_ = blocks("bash")
    commands = [c.split()[:2] for c in command_lines(first)]
    assert commands == [["make", "demo"], ["make", "test"]], "the two set-up commands come first, alone"
    assert text.index("```bash") < text.index("\n## "), "the two set-up commands come before any section"
    assert "## Results" in text
    (line, quickstart), *_ = PYTHON_BLOCKS
    assert len([ln for ln in quickstart.splitlines() if ln.strip()]) <= 15, f"README.md:{line}: quickstart > 15 lines"


@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env()
    )
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize(
    ("line", "command"), CHEAP_COMMANDS, ids=[f"README.md:{line}:{c.split()[1]}" for line, c in CHEAP_COMMANDS]
)
def test_cheap_command_runs(line: int, command: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(tmp_path)
    )
    assert proc.returncode == 0, f"README.md:{line}: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"README.md:{line}: {command} printed nothing"


def _env(tmp_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)  # a world of one, whatever launched pytest
    if tmp_path is not None:
        env["SUPERMOE_EXAMPLES_OUT"] = str(tmp_path)
    return env
