"""A remote A2A agent as a tool: the model asks it in text (or data), the tool returns its answer.

    tool = await a2a_tool("https://agents.example/a2a/translator", token=os.environ["TRANSLATOR_TOKEN"])
    agent.tools.add(tool)

`a2a_tool` reads the agent's card (``<url>/.well-known/agent-card.json``, or the card URL
itself) with the A2A SDK's client, and makes a `Tool` whose description is the card's (its
description and skills) and whose arguments are ``text`` and/or ``data``. A call sends one
message (a text part, a data part) and waits for the task to end: a completed task's
artifacts (text, data as JSON) are the tool's result; a failed, cancelled or rejected one, a
remote error, an unreachable agent or no answer within ``timeout`` is a `ToolError` the
model sees, never a crash of the handler. A call given up on (its timeout, the handler's
cancellation) cancels the remote task it started.

The token travels only in the ``Authorization`` header of those requests: it is in no log
line, no error message and no dead letter. The calls go where the card's interfaces point,
so a card whose interface URL has another origin (scheme, host, port) than the card's URL is
refused at set-up (`ToolFailed`) unless ``allow_other_origin=True``; one that would take an
``https`` agent to plain ``http`` is refused whatever is allowed. A card is another party's
text: its description reaches the model cut to `MAX_DESCRIPTION` characters, and is as
trustworthy as its author.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterable
from typing import Any, Final

import httpx
import msgspec
import structlog
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    A2AClientTimeoutError,
    Client,
    ClientConfig,
    ClientFactory,
)
from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_text_part
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.types import Message as A2AMessage
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from a2a.utils.errors import A2AError

from mesh.llm.tools import Tool, ToolFailed, ToolInputInvalid, ToolTimeout, schema_of

MAX_DESCRIPTION: Final = 2000
MAX_RESULT: Final = 64_000  # characters of an answer given to the model
CANCEL_WAIT: Final = 5.0  # seconds a given-up call waits for the remote task's cancellation
_NAME = re.compile(r"[^A-Za-z0-9_-]+")

log = structlog.get_logger("mesh.llm.a2a")


class A2AArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the model sends the remote agent: text, structured data, or both."""

    text: str = ""
    data: dict[str, Any] | None = None


async def a2a_tool(
    url: str,
    *,
    name: str | None = None,
    token: str | None = None,
    timeout: float = 60.0,
    permissions: Iterable[str] = (),
    approval: bool = False,
    metadata: dict[str, Any] | None = None,
    allow_other_origin: bool = False,
) -> Tool:
    """A `Tool` calling the A2A agent at `url` (its base URL or its card's URL).

    ``name``: the tool's name (default ``ask_<the card's name>``). ``token``: a bearer token
    for the card and the calls. ``timeout``: seconds per call (the card is read within it
    too). ``metadata``: sent with every message (e.g. ``{"mesh.type": "..."}`` for a mesh
    gateway's agent that takes several types). ``permissions`` and ``approval`` as for
    ``@agent.tool``. ``allow_other_origin``: let the card send the calls (and the token) to
    another origin than its own URL's (never from ``https`` to ``http``). A card that cannot
    be read, or points elsewhere, raises `ToolFailed` here, at set-up.
    """
    base, card_path = _split(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tool_name = name or _NAME.sub("_", f"ask_{_host(base)}")[:64]
    async with httpx.AsyncClient(headers=headers, timeout=timeout) as http:
        try:
            card = await A2ACardResolver(http, base, card_path).get_agent_card()
        except (A2AClientError, A2AError) as exc:
            raise ToolFailed(tool_name, f"the agent card at {_shown(base)} cannot be read: {exc}") from None
    if name is None:
        tool_name = _NAME.sub("_", f"ask_{card.name}")[:64] if card.name else tool_name
    _check_origin(tool_name, base, card, allow_other_origin)
    extra = dict(metadata or {})

    async def call(args: Any) -> str:
        assert isinstance(args, A2AArgs)  # Tool.run validated it
        if not args.text and args.data is None:
            raise ToolInputInvalid(tool_name, "give text, data or both")
        parts: list[Part] = []
        if args.text:
            parts.append(new_text_part(args.text))
        if args.data is not None:
            parts.append(new_data_part(args.data))
        message = A2AMessage(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=parts, metadata=extra)
        return await _ask(tool_name, card, headers, timeout, SendMessageRequest(message=message))

    log.info("a2a tool ready", tool=tool_name, agent=card.name, url=_shown(base))
    return Tool(
        name=tool_name,
        description=_description(card),
        input_schema=schema_of(A2AArgs),
        call=call,
        params=A2AArgs,
        timeout=timeout,
        permissions=frozenset(permissions),
        approval=approval,
        source=f"a2a:{card.name or _host(base)}",
    )


async def _ask(
    tool: str, card: AgentCard, headers: dict[str, str], timeout: float, request: SendMessageRequest
) -> str:
    """Send, follow the task to its end, and read it. Streamed when the agent streams: the
    task's id is known from its first update, so a call given up on (its timeout, the
    handler's cancellation) cancels the remote task instead of leaving it running."""
    # the HTTP timeout a little past the call's own: the call's deadline (Tool.run's, which
    # cancels it, and so the remote task) comes first; the HTTP one is a backstop
    async with httpx.AsyncClient(headers=headers, timeout=timeout + CANCEL_WAIT) as http:
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
        task_id = ""
        try:
            last: StreamResponse | None = None
            async for response in client.send_message(request):
                last = response
                task_id = task_id or _task_id(response)
            if last is not None and last.HasField("message"):
                return _text(list(last.message.parts))
            if last is not None and last.HasField("task"):
                task = last.task  # not streamed: the task as it ended
            elif task_id:
                task = await client.get_task(GetTaskRequest(id=task_id))
            else:
                raise ToolFailed(tool, "the remote agent sent nothing back")
        except A2AClientTimeoutError:
            await _give_up(client, task_id)
            raise ToolTimeout(tool, f"the remote agent did not answer within {timeout:g}s") from None
        except (A2AClientError, A2AError) as exc:
            detail = f" {exc.data}" if isinstance(exc, A2AError) and exc.data else ""
            raise ToolFailed(tool, f"the remote agent refused the call: {exc}{detail}") from None
        except asyncio.CancelledError:  # the tool's timeout, or the handler's cancellation
            await _give_up(client, task_id)
            raise
        finally:
            await client.close()
    said = _text(list(task.status.message.parts)) if task.status.HasField("message") else ""
    if task.status.state != TaskState.TASK_STATE_COMPLETED:
        state = TaskState.Name(task.status.state).removeprefix("TASK_STATE_").lower()
        raise ToolFailed(tool, f"the remote task is {state}" + (f": {said}" if said else ""))
    answer = "\n".join(t for a in task.artifacts if (t := _text(list(a.parts))))
    return (answer or said or "(the remote agent completed without an answer)")[:MAX_RESULT]


async def _give_up(client: Client, task_id: str) -> None:
    """A call given up on here: cancel its task there too, within `CANCEL_WAIT` seconds
    whatever happens meanwhile (a second cancellation of this call included)."""
    if task_id:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            cancel = client.cancel_task(CancelTaskRequest(id=task_id))
            await asyncio.wait_for(asyncio.shield(cancel), CANCEL_WAIT)


def _task_id(response: StreamResponse) -> str:
    if response.HasField("task"):
        return str(response.task.id)
    if response.HasField("status_update"):
        return str(response.status_update.task_id)
    if response.HasField("artifact_update"):
        return str(response.artifact_update.task_id)
    return ""


def _text(parts: list[Part]) -> str:
    texts = get_text_parts(parts)
    data = [msgspec.json.encode(d).decode() for d in get_data_parts(parts)]
    return "\n".join([*texts, *data])


def _description(card: AgentCard) -> str:
    skills = "; ".join(f"{s.name}: {s.description}" for s in card.skills)
    text = f"{card.description} (a remote agent, {card.name}, over A2A" + (
        f"; skills: {skills}" if skills else ""
    )
    return text[: MAX_DESCRIPTION - 1] + ")"


def _split(url: str) -> tuple[str, str]:
    """(base URL, card path) of an agent's base URL or its card's URL."""
    if url.endswith(AGENT_CARD_WELL_KNOWN_PATH):
        return url[: -len(AGENT_CARD_WELL_KNOWN_PATH)], AGENT_CARD_WELL_KNOWN_PATH
    return url.rstrip("/"), AGENT_CARD_WELL_KNOWN_PATH


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _check_origin(tool: str, base: str, card: AgentCard, allowed: bool) -> None:
    """The calls (and the token with them) go only to the card's own origin, unless another is
    allowed; never from https to plain http."""
    mine = httpx.URL(base)
    for interface in card.supported_interfaces:
        there = httpx.URL(interface.url)
        if mine.scheme == "https" and there.scheme != "https":
            plain = there.scheme or "http"
            raise ToolFailed(tool, f"the card at {_shown(base)} sends calls over plain {plain}")
        if _origin(there) != _origin(mine) and not allowed:
            raise ToolFailed(
                tool,
                f"the card at {_shown(base)} sends calls to another origin ({_shown(interface.url)}); "
                "pass allow_other_origin=True if that agent is trusted with the token",
            )


def _host(url: str) -> str:
    return httpx.URL(url).host or "agent"


def _shown(url: str) -> str:
    """A URL for logs and errors: no query (a token may hide there), no user info."""
    u = httpx.URL(url)
    return str(u.copy_with(query=None, fragment=None, username=None, password=None))
