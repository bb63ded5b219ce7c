"""The package's shape: no import cycles among the modules' top-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).parent.parent / "mesh"


def _modules() -> dict[str, Path]:
    out = {}
    for path in MESH.rglob("*.py"):
        parts = path.relative_to(MESH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The mesh modules `path` imports when it is imported: top-level statements only, not
    `if TYPE_CHECKING:` blocks nor imports inside functions."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for n in ast.walk(node):
            if (
                isinstance(n, ast.ImportFrom)
                and n.level == 0
                and n.module
                and n.module.split(".")[0] == "mesh"
            ):
                subs = [f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in known]
                found.update(subs)
                if len(subs) < len(n.names) and n.module in known:
                    found.add(n.module)
            elif isinstance(n, ast.Import):
                found.update(a.name for a in n.names if a.name in known)
    return found


def test_no_module_imports_itself_through_others() -> None:
    known = _modules()
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The layers, lowest first. A module may use (at import time or inside a function) modules
# of its own layer and the layers below; a layer above is reachable only for annotations
# (`if TYPE_CHECKING:`). `mesh.join` declares joins from wire types only, so it sits with
# the wire; `mesh`, `mesh.testing` and `mesh.__main__` are the public face, on top.
LAYERS = [
    ("mesh.wire", "mesh.join"),
    ("mesh.transport",),
    ("mesh.middleware",),
    ("mesh.observability",),
    ("mesh.runtime",),
    ("mesh.llm",),
    ("mesh.patterns",),
    ("mesh.memory",),
    ("mesh.agent",),
    ("mesh.services", "mesh.gateway"),
    ("mesh.cli",),
    ("mesh", "mesh.testing", "mesh.__main__"),
]


def _layer(module: str) -> int:
    best, rank = "", -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, i
    assert rank >= 0, f"{module} is in no layer: add its folder to LAYERS"
    return rank


def _runtime_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every mesh module `path` imports when it runs: at the top or inside functions, not
    in `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module.split(".")[0] == "mesh":
                    for a in child.names:
                        full = f"{child.module}.{a.name}"
                        found.add(full if full in known else child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "mesh")
            walk(child)

    walk(ast.parse(path.read_text()))
    return found


def test_every_module_is_in_a_layer() -> None:
    for name in _modules():
        _layer(name)


def test_no_module_uses_a_layer_above_its_own() -> None:
    known = _modules()
    upward = []
    for name, path in sorted(known.items()):
        for dep in sorted(_runtime_imports(path, known)):
            if dep in known and _layer(dep) > _layer(name):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports from a higher layer: " + "; ".join(upward)
