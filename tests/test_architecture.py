"""The package's layout as a rule: each layer imports only layers below it, no import circles,
no private name imported across modules, no module over ~350 lines without a stated reason.

Layers, from the bottom (docs/architecture.md draws them): the op and the standalone helpers;
the Meta layers; one inner step and the paper's networks; the algorithm and the drop-ins for
other libraries; the package's own namespace; training; the benchmark; the command line.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "mamlext"
LAYERS = {
    "mamlext.ops": 0, "mamlext.heap": 0, "mamlext.schedules": 0, "mamlext.data": 0,
    "mamlext.distributed": 0, "mamlext.version": 0,
    "mamlext.modules": 1,
    "mamlext.inner": 2, "mamlext.models": 2,
    "mamlext.maml": 3, "mamlext.higher": 3, "mamlext.compat": 3,
    "mamlext": 4,  # the package's __init__: the public names
    "mamlext.train": 5,
    "mamlext.bench": 6,
    "mamlext.cli": 7, "mamlext.__main__": 8,
}  # fmt: skip
SIZE_LIMIT = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(name: str) -> str:
    """The entry of LAYERS that ``name`` belongs to (the longest matching prefix)."""
    matches = [c for c in LAYERS if name == c or name.startswith(c + ".")]
    assert matches, f"{name} is in no layer of tests/test_architecture.py"
    return max(matches, key=len)


def imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for each ``import`` / ``from ... import`` of mamlext."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            if node.module.startswith("mamlext"):
                found.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("mamlext")]
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def target(module: str, names: list[str]) -> list[str]:
    """The modules an import reaches (``from mamlext.x import y`` may name submodule y)."""
    reached = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return reached or [module]


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_imports_a_layer_above_its_own(name):
    own = component(name)
    for module, names, line in imports(MODULES[name], top_level_only=False):
        for reached in target(module, names):
            other = component(reached)
            assert LAYERS[other] < LAYERS[own] or other == own, (
                f"{name}:{line} imports {reached} ({other}, layer {LAYERS[other]}) from layer "
                f"{LAYERS[own]}"
            )


def test_no_import_circles():
    graph = {
        name: {r for m, names, _ in imports(path, top_level_only=True) for r in target(m, names)}
        for name, path in MODULES.items()
    }
    graph = {name: {r for r in edges if r in MODULES} for name, edges in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [name, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"),
                  *(REPO / "benchmarks").glob("*.py"), *(REPO / "examples").glob("*.py"),
                  *(REPO / "scripts").rglob("*.py")])  # fmt: skip


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_imported_across_modules(path):
    for module, names, line in imports(path, top_level_only=False):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        parts = [p for p in module.split(".") if p.startswith("_") and p != "__main__"]
        assert not private and not parts, f"{path.name}:{line}: from {module} import {names}"


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_stay_short_or_say_why(name):
    text = MODULES[name].read_text()
    if len(text.splitlines()) <= SIZE_LIMIT:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "Longer than" in docstring, (
        f"{name} has {len(text.splitlines())} lines: split it, or say at its top why not "
        f"(a sentence beginning 'Longer than {SIZE_LIMIT} lines')"
    )
