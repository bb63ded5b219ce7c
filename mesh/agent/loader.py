"""Finding an agent from a `module:attribute` or `path/to/file.py:attribute` spec."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from mesh.agent.declaration import Agent
from mesh.wire.errors import ConfigError


def import_module(target: str) -> ModuleType:
    """Import a dotted module name or a ``.py`` file path."""
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.exists():
            raise ConfigError(f"file {target!r} does not exist")
        resolved = path.resolve()
        digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
        module_name = f"mesh_user_{path.stem}_{digest}"  # same stem in two dirs: two modules
        if module_name in sys.modules:
            return sys.modules[module_name]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot import {target!r} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        sys.path.insert(0, str(resolved.parent))
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import module {target!r} ({exc}); check the spelling, or give a file path "
            f"like ./my_agent.py"
        ) from None


def import_types(modules: str) -> None:
    """Import the comma-separated modules/files that declare message types (MESH_TYPES)."""
    import mesh.schemas  # noqa: F401  (the project's own types)

    for target in (m.strip() for m in modules.split(",")):
        if target:
            import_module(target)


def load_agent(spec: str) -> Agent:
    """Load the `Agent` named by `spec`; the attribute defaults to ``agent``."""
    target, _, attr = spec.partition(":")
    attr = attr or "agent"
    if not target:
        raise ConfigError(f"agent spec {spec!r} is empty: write `module.path:agent` or `file.py:agent`")
    module = import_module(target)
    found = getattr(module, attr, None)
    if not isinstance(found, Agent):
        names = [n for n, v in vars(module).items() if isinstance(v, Agent)]
        hint = f"; agents in that module: {', '.join(names)}" if names else ""
        raise ConfigError(f"{target}:{attr} is not a mesh.Agent{hint}")
    return found
