"""Every citation in code, configs and markdown resolves to a file (and heading) in this repository.

The repository stands on its own: a reader who clones it must be able to follow every pointer. Checked, in every
source, config, notebook, script and markdown file (:data:`SCANNED`):

- **path citations** -- ``docs/<file>.md``, ``docs/<file>.md#<anchor>``, ``reports/...`` and
  ``BENCHMARKS.md[#<anchor>]`` anywhere in the text, resolved from the repository root;
- **markdown links** -- ``[text](target)`` in ``.md`` files whose target is not a URL, resolved from the linking
  file's folder (``#anchor`` alone: a heading of the same file);
- **anchors** -- the GitHub slug of a heading of the cited markdown file (:func:`slugs`);
- **outside documents** -- no file may mention the design notes that live outside the repository, by name or by
  their ``../shared`` folder (:data:`FORBIDDEN`): their facts belong in ``docs/``.

Run outputs (``reports/<study>/runs/``, gitignored, written by ``compare``/``ablate``) are exempt from existing.

The ```python blocks of ``docs/*.md`` run too, each in a fresh interpreter from the repository root, and so do the
cheap commands of their ```bash blocks, by the rule and in the way tests/test_readme.py runs the README's.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from tests.test_readme import command_lines, is_cheap

ROOT = Path(__file__).resolve().parents[1]

# What is scanned: (folder, glob) pairs under the root. Root-level markdown is scanned too.
SCANNED = (
    ("supermoe_rec", "**/*.py"),
    ("configs", "**/*.yaml"),
    ("tests", "**/*.py"),
    ("examples", "**/*.py"),
    ("examples", "**/*.ipynb"),
    ("benchmarks", "**/*.py"),
    ("scripts", "**/*"),
    ("docs", "**/*.md"),
    ("reports", "**/*.md"),
    (".", "*.md"),
    ("requirements", "*.txt"),
    (".", "Makefile"),
    (".", "pyproject.toml"),
    (".", "setup.cfg"),
)
# Spelled in two halves so that this file does not trip its own check.
FORBIDDEN = ("DESIGN" + ".md", "../" + "shared")

PATH_CITATION = re.compile(
    r"(?<![\w./-])((?:docs/[\w./-]*\w\.md|BENCHMARKS\.md|reports/[\w./-]*[\w/])(?:#[\w-]+)?)",
)
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
GENERATED = re.compile(r"^reports/[^/]+/runs(/|$)")


def slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats get ``-1``, ``-2``.

    Example::

        >>> sorted(slugs("# The loss: L = a + b\\n## Results\\n## Results\\n```\\n# not a heading\\n```"))
        ['results', 'results-1', 'the-loss-l--a--b']
    """
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", markdown)):
        text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", match[1]).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def scanned_files(root: Path) -> list[Path]:
    files: set[Path] = set()
    for folder, pattern in SCANNED:
        base = root / folder
        if base.is_dir():
            files.update(p for p in base.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    # This file is left out: its checker tests hold deliberately broken citations.
    files.discard(Path(__file__).resolve())
    return sorted(p for p in files if not GENERATED.match(p.relative_to(root).as_posix()))


def _python_prose(source: str) -> list[tuple[int, int]]:
    """Character spans of a Python file's comments and docstrings, doctest lines left out: where a ``reports/``
    path is a citation. Elsewhere in code it is a value (an output directory), which need not exist."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return starts[row - 1] + col

    spans = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        tree = ast.parse(source)
    except (SyntaxError, tokenize.TokenError):
        return [(0, len(source))]  # not parseable: everything counts
    spans += [(offset(*t.start), offset(*t.end)) for t in tokens if t.type == tokenize.COMMENT]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            doc = body[0].value
            if isinstance(doc, ast.Constant) and isinstance(doc.value, str) and doc.end_lineno is not None:
                start, end = offset(doc.lineno, doc.col_offset), offset(doc.end_lineno, doc.end_col_offset or 0)
                cut = start
                for line in source[start:end].splitlines(keepends=True):
                    if not line.lstrip().startswith((">>>", "...")):
                        spans.append((cut, cut + len(line)))
                    cut += len(line)
    return spans


def _check_target(target: Path, anchor: str | None, root: Path) -> str | None:
    """Why ``target[#anchor]`` does not resolve, or None when it does."""
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        return "points outside the repository"
    if not target.exists():
        return "no such file"
    if anchor is not None:
        if target.suffix != ".md" or not target.is_file():
            return f"#{anchor} on a file that is not markdown"
        if anchor not in slugs(target.read_text(encoding="utf-8")):
            return f"no heading with anchor #{anchor}"
    return None


def citation_errors(path: Path, root: Path) -> list[str]:
    """Every citation of ``path`` (a file under ``root``) that does not resolve, as ``file:line: what: why``."""
    text = path.read_text(encoding="utf-8", errors="replace")
    rel = path.relative_to(root).as_posix()
    errors = []

    def where(pos: int) -> str:
        return f"{rel}:{text.count(chr(10), 0, pos) + 1}"

    for word in FORBIDDEN:
        for m in re.finditer(re.escape(word), text):
            errors.append(f"{where(m.start())}: mentions {word}, which is not in the repository: cite docs/ instead")
    prose = _python_prose(text) if path.suffix == ".py" else None
    for m in PATH_CITATION.finditer(text):
        cited = m[1]
        file_part, _, anchor = cited.partition("#")
        file_part = file_part.rstrip(".")
        if GENERATED.match(file_part):
            continue
        if prose is not None and cited.startswith("reports/") and not any(a <= m.start() < b for a, b in prose):
            continue  # a path value in code (an output directory, a doctest), not a citation
        why = _check_target(root / file_part, anchor or None, root)
        if why:
            errors.append(f"{where(m.start())}: {cited}: {why}")
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            link = m[1].strip("<>")
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            file_part, _, anchor = link.partition("#")
            target = path if file_part == "" else path.parent / file_part
            if GENERATED.match(Path(os.path.relpath(target, root)).as_posix()):
                continue
            why = _check_target(target, anchor or None, root)
            if why:
                errors.append(f"{where(m.start())}: link {link}: {why}")
    return list(dict.fromkeys(errors))  # [docs/x.md](docs/x.md) cites the same path twice on one line


# ----------------------------------------------------------------------------------------------------- tests


def test_every_citation_resolves() -> None:
    files = scanned_files(ROOT)
    assert ROOT / "README.md" in files and ROOT / "docs" / "design.md" in files, "the scan lost its main files"
    errors = [e for f in files for e in citation_errors(f, ROOT)]
    assert not errors, "citations that do not resolve:\n" + "\n".join(errors)


def _doc_blocks(language: str) -> list[tuple[str, str]]:
    """``(docs/<file>.md:<line>, body)`` of every fenced block of ``language`` in docs/."""
    return [
        (f"{path.relative_to(ROOT).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}", m[2])
        for path in sorted((ROOT / "docs").glob("*.md"))
        for text in [path.read_text(encoding="utf-8")]
        for m in CODE_BLOCK.finditer(text)
        if m[1] == language
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RANK"}  # a world of one, whatever launched pytest


DOC_PYTHON_BLOCKS = _doc_blocks("python")
DOC_COMMANDS = [(where, cmd) for where, body in _doc_blocks("bash") for cmd in command_lines(body) if is_cheap(cmd)]


@pytest.mark.parametrize(("where", "code"), DOC_PYTHON_BLOCKS, ids=[w for w, _ in DOC_PYTHON_BLOCKS])
def test_doc_python_block_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env()
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize(("where", "command"), DOC_COMMANDS, ids=[f"{w}:{c.split()[1]}" for w, c in DOC_COMMANDS])
def test_doc_cheap_command_runs(where: str, command: str, tmp_path: Path) -> None:
    env = {**_env(), "SUPERMOE_EXAMPLES_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{where}: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{where}: {command} printed nothing"


def package_layers(design: str) -> dict[str, int]:
    """Top-level module or folder of ``supermoe_rec`` -> its row in design.md's package table (0 = top row)."""
    section = design.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    layers: dict[str, int] = {}
    for i, row in enumerate(rows[: next(i for i, r in enumerate(rows) if r.startswith("| `configs/`"))]):
        for name in re.findall(r"`([\w/]+?)(?:\.py|/)`", row.split("|")[1]):
            layers[name] = i  # "config", "data" (a folder) or "data/schema" (one module of a folder)
    return layers


def upward_imports(layers: dict[str, int], package: Path) -> list[str]:
    """Imports of a ``supermoe_rec`` module from a lower row of the table (``if TYPE_CHECKING:`` imports excepted),
    and modules the table does not list."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        top = "/".join(parts[:2]) if "/".join(parts[:2]) in layers else parts[0]
        if top == "__init__":
            continue
        if top not in layers:
            problems.append(f"{path.relative_to(package.parent)}: not in docs/design.md's package table")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                target = "/".join(parts[1:3]) if "/".join(parts[1:3]) in layers else parts[1] if len(parts) > 1 else ""
                if parts[0] == "supermoe_rec" and layers.get(target, -1) > layers[top]:
                    problems.append(f"{path.relative_to(package.parent)}:{node.lineno}: imports {name}, a lower row")
    return problems


def test_package_table_matches_the_imports() -> None:
    layers = package_layers((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    assert {"config", "data", "modules", "objectives", "models", "distributed", "training", "cli"} <= set(layers), (
        layers
    )
    problems = upward_imports(layers, ROOT / "supermoe_rec")
    assert not problems, "docs/design.md#package-layout does not match the code:\n" + "\n".join(problems)


def test_package_table_check_can_fail(tmp_path: Path) -> None:
    package = tmp_path / "supermoe_rec"
    (package / "modules").mkdir(parents=True)
    (package / "modules" / "moe.py").write_text("from supermoe_rec.training.trainer import x\n")
    (package / "training").mkdir()
    (package / "training" / "trainer.py").write_text("from supermoe_rec.modules.moe import y\n")
    (package / "extra.py").write_text("")
    layers = package_layers("## Package layout\n| `modules/` | a |\n| `training/` | b |\n| `configs/` | c |\n## Next\n")
    assert layers == {"modules": 0, "training": 1}
    assert upward_imports(layers, package) == [
        "supermoe_rec/extra.py: not in docs/design.md's package table",
        "supermoe_rec/modules/moe.py:1: imports supermoe_rec.training.trainer, a lower row",
    ]


def test_docs_cover_the_manual() -> None:
    assert any(w.startswith("docs/api.md") for w, _ in DOC_PYTHON_BLOCKS), "docs/api.md lost its Python examples"
    commands = [c for _, c in DOC_COMMANDS]
    assert any("data summary" in c for c in commands) and any("--help" in c for c in commands), commands
    for name in ("design", "protocol", "training", "api", "data"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A tiny repository: docs/a.md with two headings, one report, one benchmark file."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## The loss: L = a + b\n\ntext\n")
    (tmp_path / "reports" / "study").mkdir(parents=True)
    (tmp_path / "reports" / "study" / "report.md").write_text("# Report\n")
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n## 1. Speed\n")
    (tmp_path / "pkg").mkdir()
    return tmp_path


def _errors_of(repo: Path, name: str, text: str) -> list[str]:
    path = repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return citation_errors(path, repo)


def test_checker_accepts_good_citations(repo: Path) -> None:
    code = (
        '"""See docs/a.md, docs/a.md#the-loss-l--a--b and reports/study/report.md (BENCHMARKS.md#1-speed)."""\n'
        "# outputs go to reports/study/runs/<key>/, written at run time\n"
        'OUT = "reports/new"  # a path value, not a citation\n'
        'def f():\n    """Example::\n\n        >>> f("reports/other/x.md")\n    """\n'
    )
    assert _errors_of(repo, "pkg/mod.py", code) == []
    markdown = "# Doc\n[a](a.md#title), [top](#doc), [readme](../BENCHMARKS.md), [web](https://x.org/y.md)\n"
    assert _errors_of(repo, "docs/b.md", markdown) == []


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("pkg/mod.py", "# see docs/missing.md\n", "docs/missing.md: no such file"),
        ("pkg/mod.py", "x = 1  # docs/a.md#no-such-heading\n", "docs/a.md#no-such-heading: no heading"),
        ("pkg/mod.py", "# reports/study/gone.md\n", "reports/study/gone.md: no such file"),
        ("pkg/mod.py", 'def f():\n    """Writes reports/study/gone.md."""\n', "pkg/mod.py:2: reports/study/gone.md"),
        ("pkg/mod.py", "# BENCHMARKS.md#2-memory\n", "BENCHMARKS.md#2-memory: no heading"),
        ("pkg/mod.py", "# the split (" + "DESIGN" + ".md §4)\n", "pkg/mod.py:1: mentions DESIGN"),
        ("cfg.yaml", "seed: 0  # ../" + "shared/notes\n", "mentions ../shared"),
        ("docs/b.md", "# B\nsee [a](c.md)\n", "docs/b.md:2: link c.md: no such file"),
        ("docs/b.md", "# B\nsee [a](#nope)\n", "link #nope: no heading"),
        ("docs/b.md", "# B\n[up](../../etc/passwd)\n", "points outside the repository"),
    ],
)
def test_checker_rejects_bad_citations(repo: Path, name: str, text: str, expected: str) -> None:
    errors = _errors_of(repo, name, text)
    assert len(errors) == 1 and expected in errors[0], errors
