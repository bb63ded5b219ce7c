"""Declaring an agent: a name and typed handlers.

    agent = Agent("triage", description="Classifies support tickets")

    @agent.handler
    async def on_ticket(ticket: TicketOpened, ctx: Context) -> None:
        await ctx.handoff("research", ResearchRequest(...))

The type of a handler's first parameter picks the messages it gets (a union picks
several). An optional second parameter receives the `Context`. A returned message
is sent as the reply. Annotations are read once, here; mistakes fail at declaration.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mesh.join import Join, Policy, Resolver, all_of
from mesh.llm.a2a_declared import A2ADeclaration
from mesh.llm.mcp import Declaration, Declared
from mesh.llm.sandbox import Sandbox
from mesh.llm.tools import Toolbox
from mesh.memory.scopes import namespace_patterns
from mesh.patterns.escalation import HUMAN
from mesh.wire import subjects
from mesh.wire.errors import RegistrationError
from mesh.wire.messages import Message, MessageType, type_of

if TYPE_CHECKING:
    from mesh.middleware.base import Middleware
    from mesh.middleware.publish import PublishMiddleware

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T", bound=Message)


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler: the function, the message type it takes, and how to call it."""

    fn: Callable[..., Awaitable[Any]]
    mtype: MessageType
    takes_context: bool
    events: bool  # also receive this type's events, not only inbox deliveries
    escalate: str = ""  # after the last retry: a fallback agent, or HUMAN (mesh.patterns.escalation)

    @property
    def name(self) -> str:
        return self.fn.__name__


class Agent:
    """A named set of typed handlers. Run it with `mesh run module:agent`."""

    def __init__(
        self,
        name: str,
        *,
        description: str = "",
        version: str = "0.1.0",
        concurrency: int | None = None,
        middleware: Sequence[Middleware] = (),
        publish_middleware: Sequence[PublishMiddleware] = (),
        permissions: Sequence[str] = (),
        memory_scopes: Sequence[str] | None = None,
        escalate: str = "",
    ) -> None:
        self.name = subjects.agent_name(name)
        # where a message goes that failed its last retry, unless its handler says otherwise:
        # a fallback agent's name, or HUMAN (a queue people work through: `mesh escalations`)
        self.escalate = _escalation(escalate, name)
        self.permissions = frozenset(permissions)  # what this agent's tools may require
        # the memory namespaces it may use (None: not declared, any the operator allows)
        self.memory_scopes = (
            namespace_patterns(memory_scopes, f"Agent({name!r}, memory_scopes=...)")
            if memory_scopes is not None
            else None
        )
        self.tools = Toolbox()  # the only tools its model may call (mesh.llm.tools)
        # MCP servers and A2A agents whose tools are in `tools` while the agent runs
        self.mcp_servers = Declared()
        self.description = description
        self.version = version
        self.concurrency = concurrency
        self.middleware = tuple(middleware)  # around each handler, after the mesh's own
        self.publish_middleware = tuple(publish_middleware)  # on each send, after the mesh's own
        self._handlers: dict[tuple[str, int], Handler] = {}
        self._latest: dict[str, Handler] = {}
        self.joins: dict[str, Join[Any]] = {}

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, handles={[str(h.mtype) for h in self.handlers]})"

    @property
    def handlers(self) -> list[Handler]:
        return list(self._handlers.values())

    def handler_for(self, type_name: str, version: int | None) -> Handler | None:
        if version is None:
            return self._latest.get(type_name)
        return self._handlers.get((type_name, version))

    def join(
        self,
        name: str,
        *types: type[T],
        policy: Policy | None = None,
        resolve: Resolver | None = None,
    ) -> Join[T]:
        """Declare a fan-in point gathering answers of ``types`` (see `Context.fan_out`).

        ``policy``: `all_of()` (default), `quorum(n)` or `first(k)`; ``resolve``:
        `majority(key)`, `merge(fn)` or `judge(agent)` (all from `mesh.join`) picks
        `Gathered.resolved` when answers disagree.
        """
        if name in self.joins:
            raise RegistrationError(f"agent {self.name!r} already has a join named {name!r}")
        if not types:
            raise RegistrationError(f"join {name!r}: name the message type(s) it gathers")
        for cls in types:
            if not (isinstance(cls, type) and issubclass(cls, Message)):
                raise RegistrationError(f"join {name!r}: {cls!r} is not a mesh.Message type")
        j = Join(self.name, name, types, policy or all_of(), resolve)
        self.joins[name] = j
        return j

    def tool(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        permissions: Sequence[str] = (),
        approval: bool = False,
        sandbox: Sandbox | bool | None = None,
    ) -> Callable[[F], F]:
        """Register a tool this agent's model may call: ``async def f(args: SomeStruct) -> ...``
        with a docstring. ``approval=True``: it runs only after a person approves each call.
        ``sandbox``: run it out of process with limits (mesh.llm.sandbox); the default for
        ``approval=True`` tools, ``sandbox=False`` to run it in the agent's process."""

        def register(f: F) -> F:
            self.tools.register(
                f, name=name, timeout=timeout, permissions=permissions, approval=approval, sandbox=sandbox
            )
            return f

        return register

    def mcp_server(
        self,
        command: Sequence[str],
        *,
        name: str,
        allow: Sequence[str] | None = None,
        permissions: Sequence[str] = (),
        approval: Sequence[str] = (),
        timeout: float | None = None,
        prefix: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        start_timeout: float = 10.0,
        sandbox: Sandbox | bool = True,
    ) -> None:
        """Declare an MCP server (stdio) whose tools this agent's model may call: it is
        started and its tools imported when the agent starts, and closed when it stops.
        The arguments are those of `mesh.llm.mcp.import_tools`; an import that fails stops the
        agent's start with the reason."""
        if not command:
            raise RegistrationError(f"MCP server {name!r}: give the command that starts it")
        self.mcp_servers.add(
            Declaration(
                command=tuple(command),
                name=name,
                allow=tuple(allow) if allow is not None else None,
                permissions=tuple(permissions),
                approval=tuple(approval),
                timeout=timeout,
                prefix=prefix,
                env=env,
                cwd=cwd,
                start_timeout=start_timeout,
                sandbox=sandbox,
            )
        )

    def a2a_agent(
        self,
        url: str,
        *,
        name: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        permissions: Sequence[str] = (),
        approval: bool = False,
        metadata: Mapping[str, Any] | None = None,
        allow_other_origin: bool = False,
    ) -> None:
        """Declare a remote A2A agent this agent's model may call as a tool: its card is read
        when the agent starts (a card that cannot be read stops the start, saying why) and
        the tool (mesh.llm.a2a.a2a_tool, with these arguments) leaves when it stops."""
        decl = A2ADeclaration(
            url, name, token, timeout, tuple(permissions), approval, metadata, allow_other_origin
        )
        self.mcp_servers.add(decl)

    @overload
    def handler(self, fn: F, /) -> F: ...

    @overload
    def handler(self, *, events: bool = True, escalate: str | None = None) -> Callable[[F], F]: ...

    def handler(
        self, fn: Callable[..., Any] | None = None, *, events: bool = True, escalate: str | None = None
    ) -> Any:
        """Register an `async def` handler; its first parameter's type selects messages.

        ``events=False`` keeps it to messages sent to this agent's inbox. ``escalate``: where
        a message goes that failed its last retry, instead of the dead letters (a fallback
        agent, or ``HUMAN``); the agent's ``escalate`` by default.
        """
        target = self.escalate if escalate is None else _escalation(escalate, self.name)

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            for h in _inspect_handler(self.name, f, events, target):
                key = (h.mtype.name, h.mtype.version)
                if key in self._handlers:
                    raise RegistrationError(
                        f"agent {self.name!r}: {h.mtype} already has a handler "
                        f"({self._handlers[key].name}); one type, one handler"
                    )
                self._handlers[key] = h
                latest = self._latest.get(h.mtype.name)
                if latest is None or latest.mtype.version < h.mtype.version:
                    self._latest[h.mtype.name] = h
            return f

        return register(fn) if fn is not None else register


def _escalation(target: str, agent: str) -> str:
    if target and target != HUMAN and not subjects.is_agent_name(target):
        raise RegistrationError(
            f"agent {agent!r}: escalate={target!r} is neither an agent's name nor mesh.HUMAN"
        )
    if target == agent:
        raise RegistrationError(f"agent {agent!r}: escalate to itself would retry for ever; name another")
    return target


def _inspect_handler(agent: str, fn: Callable[..., Any], events: bool, escalate: str = "") -> list[Handler]:
    where = f"agent {agent!r}, handler {getattr(fn, '__name__', fn)!r}"
    example = "write `async def handle(msg: MyMessage, ctx: mesh.Context) -> None`"
    if not inspect.iscoroutinefunction(fn):
        raise RegistrationError(f"{where}: handlers must be `async def` functions; {example}")
    params = list(inspect.signature(fn).parameters.values())
    if not params or len(params) > 2:
        raise RegistrationError(f"{where}: takes {len(params)} parameters, expected 1 or 2; {example}")
    try:
        hints = typing.get_type_hints(fn)
    except NameError as exc:
        raise RegistrationError(f"{where}: cannot resolve an annotation ({exc}); {example}") from None
    ann = hints.get(params[0].name)
    if ann is None:
        raise RegistrationError(f"{where}: the first parameter has no type annotation; {example}")
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        classes = list(typing.get_args(ann))
    else:
        classes = [ann]
    found = []
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise RegistrationError(
                f"{where}: the first parameter is annotated {cls!r}, which is not a mesh.Message "
                f"subclass declared with @mesh.message(...); {example}"
            )
        found.append(
            Handler(
                fn=fn, mtype=type_of(cls), takes_context=len(params) == 2, events=events, escalate=escalate
            )
        )
    return found
