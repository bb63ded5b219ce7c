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
