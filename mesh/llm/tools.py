"""Tools: typed Python functions an agent lets its model call.

    @agent.tool(timeout=5, permissions=["orders:read"])
    async def lookup_order(args: OrderQuery) -> OrderStatus:
        \"\"\"Find an order by its id.\"\"\"

The parameter's msgspec type gives the JSON Schema the model sees, and validates the
model's arguments before the function runs. Each tool has a timeout and the permissions it
needs; an agent calls only the tools registered with it, and only if its declaration grants
those permissions. ``approval=True`` marks a high-risk tool: it runs only after a person
approves the call (mesh.patterns.approval). ``sandbox=`` runs it out of the agent's process,
with limits (mesh.llm.sandbox); tools marked ``approval=True`` are sandboxed by default.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from mesh.llm.toolmeters import tool_meters
from mesh.llm.types import ToolSpec
from mesh.wire.errors import MeshError, RegistrationError

if TYPE_CHECKING:
    from mesh.llm.sandbox import Sandbox


class ToolError(MeshError):
    """A tool call could not be made or failed. ``kind`` is machine-readable: ``unknown``,
    ``not_allowed``, ``invalid_input``, ``timeout``, ``failed``, ``denied`` or ``expired``."""

    kind = "failed"

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"tool {tool!r}: {reason}")
        self.tool = tool
        self.reason = reason


class UnknownTool(ToolError):
    kind = "unknown"


class ToolNotAllowed(ToolError):
    kind = "not_allowed"


class ToolInputInvalid(ToolError):
    kind = "invalid_input"


class ToolTimeout(ToolError):
    kind = "timeout"


class ToolFailed(ToolError):
    kind = "failed"


Runner = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    call: Runner  # takes validated-or-raw arguments, returns the result
    params: type[Any] | None = None  # the msgspec type arguments are validated against
    timeout: float | None = None
    permissions: frozenset[str] = frozenset()
    approval: bool = False
    source: str = "python"  # or "mcp:<server>"
    sandbox: Sandbox | None = None  # where it runs out of process (mesh.llm.sandbox)

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
            "permissions": sorted(self.permissions),
            "approval": self.approval,
            "timeout": self.timeout,
            "source": self.source,
            "sandbox": self.sandbox.describe() if self.sandbox is not None else None,
        }

    def validate(self, args: dict[str, Any]) -> Any:
        """The arguments as the tool's type, or `ToolInputInvalid` saying what is wrong."""
        if self.params is not None:
            try:
                return msgspec.convert(args, self.params, strict=False)
            except msgspec.ValidationError as exc:
                raise ToolInputInvalid(self.name, f"invalid arguments {_short(args)}: {exc}") from None
        _check_schema(self.name, self.input_schema, args)
        return args

    async def run(self, args: dict[str, Any], default_timeout: float = 30.0) -> str:
        """Validate, run within the timeout, and render the result as text for the model
        (counted in the tool metrics, mesh.llm.toolmeters)."""
        with tool_meters().measured(self.name):
            value = self.validate(args)
            limit = self.timeout or default_timeout
            try:
                async with asyncio.timeout(limit):
                    result = await self.call(value)
            except TimeoutError:
                killed = "; its sandbox process was killed" if self.sandbox is not None else ""
                raise ToolTimeout(self.name, f"did not finish within {limit:g}s{killed}") from None
            except ToolError:
                raise
            except Exception as exc:
                raise ToolFailed(self.name, f"raised {type(exc).__name__}: {exc}") from None
            return render(result)


def render(result: Any) -> str:
    if isinstance(result, str):
        return result
    return msgspec.json.encode(result).decode()


def _short(args: Any) -> str:
    text = json.dumps(args, default=str)
    return text if len(text) <= 200 else text[:199] + "…"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _check_schema(tool: str, schema: dict[str, Any], args: dict[str, Any]) -> None:
    """The top level of a JSON Schema (required keys, property types): enough for tools
    imported from elsewhere, whose servers validate again."""
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ToolInputInvalid(tool, f"missing required argument(s) {missing} in {_short(args)}")
    props = schema.get("properties") or {}
    for key, value in args.items():
        want = (props.get(key) or {}).get("type")
        if key not in props and schema.get("additionalProperties") is False:
            raise ToolInputInvalid(tool, f"unexpected argument {key!r}")
        if isinstance(want, str) and want in _JSON_TYPES:
            ok = isinstance(value, _JSON_TYPES[want]) and not (want != "boolean" and isinstance(value, bool))
            if not ok:
                raise ToolInputInvalid(tool, f"argument {key!r} must be a {want}, got {_short(value)}")


def schema_of(params: type[Any]) -> dict[str, Any]:
    """The JSON Schema of a msgspec type, with its top-level definition inlined."""
    raw = msgspec.json.schema(params)
    defs = dict(raw.pop("$defs", {}))
    ref = raw.get("$ref", "")
    if ref.startswith("#/$defs/"):
        top = dict(defs.pop(ref.removeprefix("#/$defs/")))
        if defs:
            top["$defs"] = defs
        return top
    return raw


@dataclass
class Toolbox:
    """The tools of one agent, by name."""

    tools: dict[str, Tool] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def __iter__(self) -> typing.Iterator[Tool]:
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise RegistrationError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        return tool

    def remove(self, name: str) -> Tool | None:
        return self.tools.pop(name, None)

    def register(
        self,
        fn: Callable[..., Awaitable[Any]],
        *,
        name: str | None = None,
        timeout: float | None = None,
        permissions: Iterable[str] = (),
        approval: bool = False,
        sandbox: Sandbox | bool | None = None,
    ) -> Tool:
        """Add ``fn`` as a tool. ``sandbox``: a `Sandbox` or True to run it out of process,
        False to run it here; by default tools with ``approval=True`` are sandboxed."""
        from mesh.llm.sandbox import resolve, sandboxed

        where = f"tool {getattr(fn, '__name__', fn)!r}"
        example = "write `async def my_tool(args: MyArgs) -> str` with MyArgs a msgspec.Struct"
        if not inspect.iscoroutinefunction(fn):
            raise RegistrationError(f"{where}: tools must be `async def` functions; {example}")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) != 1:
            raise RegistrationError(f"{where}: takes {len(params)} parameters, expected 1; {example}")
        ann = typing.get_type_hints(fn).get(params[0].name)
        if not (isinstance(ann, type) and issubclass(ann, msgspec.Struct)):
            raise RegistrationError(
                f"{where}: its parameter is annotated {ann!r}, not a msgspec.Struct; {example}"
            )
        doc = inspect.getdoc(fn) or ""
        if not doc:
            raise RegistrationError(f"{where}: give it a docstring; the model reads it to choose the tool")
        box = resolve(sandbox, approval)
        tool_name = name or fn.__name__
        return self.add(
            Tool(
                name=tool_name,
                description=doc,
                input_schema=schema_of(ann),
                call=fn if box is None else sandboxed(fn, tool_name, box),
                params=ann,
                timeout=timeout,
                permissions=frozenset(permissions),
                approval=approval,
                sandbox=box,
            )
        )

    def catalog(self) -> str:
        """The tools as JSON, for discovery (`mesh tools`)."""
        return json.dumps([t.describe() for t in self.tools.values()], separators=(",", ":"))
