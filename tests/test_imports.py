"""The package's import graph: every module imports, the graph has no cycle, and the layers point one way.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import`` of a ``supermoe_rec`` module,
at module level or inside a function, except under ``if TYPE_CHECKING:``), so a cycle that only a lazy import closes
is caught too. Layering: nothing in the model's own folders (``modules``, ``objectives``, ``models``) imports
``supermoe_rec.training``, ``studies`` or ``serving``, and the building blocks (``modules``) import no
``distributed`` either; parallelism and jobs are applied to built modules from outside.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "supermoe_rec"

# The CLI and the jobs it dispatches to: the top of the graph, which no building block may import.
JOB_MODULES = (
    "supermoe_rec.cli",
    "supermoe_rec.training.trainer",
    "supermoe_rec.studies.compare",
    "supermoe_rec.studies.ablate",
    "supermoe_rec.studies.executor",
    "supermoe_rec.evaluation.export",
    "supermoe_rec.distributed.planner",
    "supermoe_rec.evaluation.probe",
    "supermoe_rec.evaluation.suite",
)
# Prefixes the building blocks (supermoe_rec.modules) must not import.
FORBIDDEN_FROM_MODULES = ("supermoe_rec.distributed", *JOB_MODULES)
# The model's own folders: what they must not import (the jobs around them).
MODEL_FOLDERS = ("supermoe_rec.modules", "supermoe_rec.objectives", "supermoe_rec.models")
FORBIDDEN_FROM_MODEL = ("supermoe_rec.training", "supermoe_rec.studies", "supermoe_rec.serving", "supermoe_rec.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to: itself, else its longest prefix that is a module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """The ``supermoe_rec`` modules ``module`` imports (outside ``if TYPE_CHECKING:`` blocks)."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from supermoe_rec.evaluation import plots`` imports the module supermoe_rec.evaluation.plots.
                target = _resolve(f"{source}.{alias.name}") or _resolve(source)
                if target is not None:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_is_read_from_the_package() -> None:
    assert "supermoe_rec.modules.moe" in GRAPH and "supermoe_rec.distributed.expert_parallel" in GRAPH
    assert "supermoe_rec.modules.moe" in GRAPH["supermoe_rec.distributed.expert_parallel"]
    assert "supermoe_rec.config.experiment" in GRAPH["supermoe_rec.training.trainer"]
    assert set(JOB_MODULES) - set(MODULES) == set(), "a job module was renamed: update JOB_MODULES"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_building_blocks_import_no_parallelism_trainer_or_job() -> None:
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.startswith("supermoe_rec.modules")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_FROM_MODULES)
    )
    assert not bad, bad


def test_model_folders_import_no_training_study_or_serving() -> None:
    assert {"supermoe_rec.objectives.task_indicator", "supermoe_rec.models.factory"} <= set(GRAPH)
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.startswith(MODEL_FOLDERS)
        for target in targets
        if target.startswith(FORBIDDEN_FROM_MODEL)
    )
    assert not bad, bad


def test_the_root_holds_at_most_six_modules() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 6, root_modules


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)
