"""Every mesh agent as an A2A agent (protocol 1.0, JSON-RPC binding), on the gateway:

===============================================  ==========================================
``GET /a2a/{agent}/.well-known/agent-card.json``  the agent's card, from discovery
``POST /a2a/{agent}``                             JSON-RPC: SendMessage, SendStreamingMessage
                                                  (SSE), GetTask, CancelTask, ListTasks; the
                                                  0.3 names (message/send, …) as well
===============================================  ==========================================

The JSON-RPC endpoint needs the gateway's bearer token; the card does too, unless the
gateway serves cards publicly (``public_cards``: a card names the agent and its message
types). The request is bounded as every gateway body is (``MESH_MAX_MESSAGE_BYTES``, read
before it is parsed), the agent name is checked before anything reaches the mesh, and a
caller sees only its own tasks. The SDK's request handler, task store and JSON-RPC
dispatcher do the protocol; mesh.gateway.a2a_tasks maps tasks onto conversations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import DefaultServerCallContextBuilder
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message as ASGIMessage

from mesh.gateway import wire
from mesh.gateway.a2a_card import Agents, agent_card, handler_card
from mesh.gateway.a2a_store import AGENT, PRINCIPAL, RecordedTasks, Running
from mesh.gateway.a2a_tasks import MeshExecutor, MeshRequestHandler

if TYPE_CHECKING:
    from mesh.gateway.app import Gateway

CARD_PATH = "/a2a/{agent}/.well-known/agent-card.json"
RPC_PATH = "/a2a/{agent}"
_SCOPE_PRINCIPAL = "mesh.principal"


class Caller(User):
    """The principal the bearer token named (``token:<name>``), as the SDK's user."""

    def __init__(self, principal: str) -> None:
        self.principal = principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self.principal


class _Context(DefaultServerCallContextBuilder):
    """The SDK's call context, carrying the agent the URL names and who is calling."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        principal = str(request.scope[_SCOPE_PRINCIPAL])
        context.user = Caller(principal)
        context.state[AGENT] = request.path_params["agent"]
        context.state[PRINCIPAL] = principal
        return context


class A2A:
    """The gateway's A2A routes. The SDK's handler is made on first use, once the gateway
    is connected to the mesh."""

    def __init__(self, gateway: Gateway, *, public_cards: bool = False) -> None:
        self.gateway = gateway
        self.public_cards = public_cards
        self.running = Running()  # the caps on running tasks (a2a_store.Running)
        self._agents: Agents | None = None
        self._handler: MeshRequestHandler | None = None
        self._dispatcher: JsonRpcDispatcher | None = None

    def routes(self) -> list[Route]:
        return [Route(CARD_PATH, self.card, methods=["GET"]), Route(RPC_PATH, self.rpc, methods=["POST"])]

    async def close(self) -> None:
        if self._handler is not None:
            await self._handler.aclose()
        self._handler = self._dispatcher = self._agents = None

    @property
    def agents(self) -> Agents:
        if self._agents is None:
            mesh = self.gateway.mesh
            self._agents = Agents(mesh.transport, mesh.directory)
        return self._agents

    @property
    def dispatcher(self) -> JsonRpcDispatcher:
        if self._dispatcher is None:
            mesh = self.gateway.mesh
            self._handler = MeshRequestHandler(
                mesh,
                self.agents,
                MeshExecutor(mesh),
                RecordedTasks(mesh),
                self.running,
                agent_card=handler_card(),
            )
            self._dispatcher = JsonRpcDispatcher(self._handler, _Context(), enable_v0_3_compat=True)
        return self._dispatcher

    async def card(self, request: Request) -> Response:
        caller = wire.trace_context(request.headers)
        with trace.get_tracer("mesh").start_as_current_span("gateway a2a card", caller, SpanKind.SERVER):
            try:
                if not self.public_cards:
                    self._caller(request)
                agent = wire.agent(request.path_params["agent"])
                found = await self.agents.get(agent)
                if found is None:
                    raise wire.Refused(404, "unknown_agent", f"no agent {agent!r} is running on the mesh")
            except wire.Refused as exc:
                return _refused(exc)
            url = str(request.base_url).rstrip("/") + RPC_PATH.format(agent=agent)
            return JSONResponse(agent_card_to_dict(agent_card(found, url)))

    async def rpc(self, request: Request) -> Response:
        caller = wire.trace_context(request.headers)  # a traced caller's trace goes on
        with trace.get_tracer("mesh").start_as_current_span("gateway a2a", caller, SpanKind.SERVER) as span:
            try:
                principal = self._caller(request)
                wire.agent(request.path_params["agent"])
                body = await self.gateway.read_body(request)
            except wire.Refused as exc:
                return _refused(exc)
            request.scope[_SCOPE_PRINCIPAL] = principal
            response = await self.dispatcher.handle_requests(_replayed(request, body))
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    def _caller(self, request: Request) -> str:
        principal = self.gateway.auth.bearer(request.headers.get("authorization", ""))
        if principal is None:
            raise wire.Refused(401, "unauthorized", "give Authorization: Bearer <token>")
        return principal


def _replayed(request: Request, body: bytes) -> Request:
    """The request with its body, already read (and bounded), given again to whoever reads it;
    after that, what the client sends (a disconnect) as before."""
    given = False

    async def receive() -> ASGIMessage:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)


def _refused(exc: wire.Refused) -> JSONResponse:
    headers: dict[str, Any] | None = (
        {"WWW-Authenticate": 'Bearer realm="mesh"'} if exc.status == 401 else None
    )
    return JSONResponse(exc.body, exc.status, headers=headers)
