"""A remote A2A agent declared on an agent (`Agent.a2a_agent`): its tool is made when the
agent starts (its card read then, not when the agent's file is imported, so `mesh agents add`
and other offline commands never reach it) and leaves the toolbox when the agent stops."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.llm.tools import Tool, Toolbox


@dataclass(frozen=True, slots=True)
class A2ADeclaration:
    """The arguments of `mesh.llm.a2a.a2a_tool`, kept until the agent starts."""

    url: str
    tool_name: str | None = None
    token: str | None = field(default=None, repr=False)  # never shown
    timeout: float = 60.0
    permissions: tuple[str, ...] = ()
    approval: bool = False
    metadata: Mapping[str, Any] | None = None
    allow_other_origin: bool = False

    @property
    def name(self) -> str:
        return self.tool_name or self.url

    async def open(self, toolbox: Toolbox) -> Attached:
        from mesh.llm.a2a import a2a_tool  # the A2A client, only for agents that use one

        tool = await a2a_tool(
            self.url,
            name=self.tool_name,
            token=self.token,
            timeout=self.timeout,
            permissions=self.permissions,
            approval=self.approval,
            metadata=dict(self.metadata or {}),
            allow_other_origin=self.allow_other_origin,
        )
        return Attached([toolbox.add(tool)])


@dataclass
class Attached:
    """A declared A2A agent's tool, in the toolbox while the agent runs."""

    tools: list[Tool]

    async def close(self) -> None:
        return None  # each call has its own connection: nothing stays open
