"""The gateway's ASGI app (Starlette): HTTP in, typed messages out, as the ``publisher`` role.

=========================================  =================================================
``POST /v1/events/{type}``                  publish an event of a message type -> 202
``POST /v1/agents/{agent}?type=T``          send a message to an agent's inbox -> 202
``POST /v1/agents/{agent}/request?type=T``  ask an agent and wait for its answer -> 200
``GET /v1/conversations/{id}``              status and result of a conversation
``GET /v1/conversations/{id}/events``       its messages live, as server-sent events
``GET /openapi.json``                       the API, with every message type's schema
``/a2a/{agent}``                            each agent as an A2A agent (mesh.gateway.a2a)
``/ui/...``                                 the web view (mesh.gateway.web)
=========================================  =================================================
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.gateway import wire
from mesh.gateway.a2a import A2A
from mesh.gateway.asking import ask
from mesh.gateway.auth import SIGNATURE_HEADER, TIMESTAMPED_HEADER, TOLERANCE, GatewayAuth, window_for
from mesh.gateway.meters import RequestMeters
from mesh.gateway.openapi import openapi
from mesh.gateway.web import WebConfig, WebView
from mesh.observability import history
from mesh.observability.tap import TapLine
from mesh.runtime.client import MeshClient
from mesh.wire import subjects
from mesh.wire.errors import RequestError, RequestFailed
from mesh.wire.settings import Settings

SENDER = "gateway"
DEFAULT_TIMEOUT = 10.0
MAX_STREAMS = 256  # conversations followed at once (each is a subscription)
_RESULT_KINDS = (subjects.EVENT, subjects.REPLY)
Handler = Callable[[Request], Awaitable[Response]]


class Gateway:
    """One MeshClient shared by every request. `app` starts and closes it with the server;
    a test may `start()` it itself and drive `app` in-process."""

    def __init__(
        self,
        settings: Settings,
        auth: GatewayAuth,
        *,
        client: MeshClient | None = None,
        public_cards: bool = False,
        web: WebConfig | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.client = client
        self._own_client = client is None
        self._streams = wire.Slots(MAX_STREAMS)  # conversations followed over SSE now
        self.a2a = A2A(self, public_cards=public_cards)
        self.web = WebView(self, web)
        self.app = Starlette(
            routes=[
                Route("/v1/events/{type}", self._guard(self.publish_event), methods=["POST"]),
                Route("/v1/agents/{agent}", self._guard(self.send_to_agent), methods=["POST"]),
                Route("/v1/agents/{agent}/request", self._guard(self.request_agent), methods=["POST"]),
                Route("/v1/conversations/{id}", self._guard(self.status), methods=["GET"]),
                Route("/v1/conversations/{id}/events", self._guard(self.events), methods=["GET"]),
                Route("/openapi.json", self._guard(self.schema), methods=["GET"]),
                *self.a2a.routes(),
                *self.web.routes,
            ],
            middleware=[Middleware(RequestMeters)],  # http.server.* metrics (mesh.gateway.meters)
            lifespan=self._lifespan,
        )

    async def start(self) -> None:
        if self.client is None:
            self.client = await MeshClient.connect(self.settings, SENDER)
        await self.web.start()

    async def close(self) -> None:
        await self.a2a.close()
        await self.web.close()
        if self._own_client and self.client is not None:
            await self.client.close()
            self.client = None

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.close()

    @property
    def mesh(self) -> MeshClient:
        if self.client is None:
            raise wire.Refused(503, "not_connected", "the gateway is not connected to the mesh")
        return self.client

    # -- guarding every endpoint: size, authentication, errors as JSON ---------------------

    def _guard(self, handler: Callable[[Request, bytes, str], Awaitable[Response]]) -> Handler:
        name = f"gateway {handler.__name__}"

        async def guarded(request: Request) -> Response:
            # one span per call: what it sends carries its trace context (Mesh trace ids)
            caller = wire.trace_context(request.headers)  # a traced caller's trace goes on
            with trace.get_tracer("mesh").start_as_current_span(name, caller, SpanKind.SERVER) as span:
                try:
                    body = await self.read_body(request)
                    principal = self._principal(request, body)
                    response = await handler(request, body, principal)
                except wire.Refused as exc:
                    response = JSONResponse(exc.body, exc.status, headers=_challenge(exc.status))
                span.set_attribute("http.response.status_code", response.status_code)
                return response

        return guarded

    async def read_body(self, request: Request, limit: int | None = None) -> bytes:
        """The body, read only up to `limit` bytes (MESH_MAX_MESSAGE_BYTES): 413 past it."""
        limit = self.settings.max_message_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise wire.Refused(413, "too_large", f"a body is at most {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise wire.Refused(413, "too_large", f"a body is at most {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _principal(self, request: Request, body: bytes) -> str:
        authorization = request.headers.get("authorization")
        signature = request.headers.get(SIGNATURE_HEADER)
        principal = None
        if authorization is not None:
            principal = self.auth.bearer(authorization)
        elif signature is not None:
            principal = self.auth.signed(request.query_params.get("source", ""), signature, body)
        elif (stamped := request.headers.get(TIMESTAMPED_HEADER)) is not None:
            source = request.query_params.get("source", "")
            window = window_for(self.settings.dedupe_window)
            principal = self.auth.timestamped(source, stamped, body, time.time(), window)
        elif request.method == "GET" and (session := self.web.session(request)) is not None:
            principal = session.principal  # a browser of the web view: reading only
        if principal is None:
            raise wire.Refused(
                401,
                "unauthorized",
                "give Authorization: Bearer <token>, or sign the body: ?source=<name> and "
                "X-Hub-Signature-256: sha256=<hex HMAC-SHA256>, or Stripe-Signature: t=<unix "
                f"seconds, within {TOLERANCE} s of ours>,v1=<hex HMAC-SHA256 of '<t>.<body>'>",
            )
        return principal

    # -- endpoints --------------------------------------------------------------------------

    async def publish_event(self, request: Request, body: bytes, principal: str) -> Response:
        mtype = wire.message_type(request.path_params["type"])
        msg = wire.decode(body, mtype)
        msg_id, conv = wire.idempotent_ids(principal, wire.delivery_key(request.headers, body))
        sent = await self.mesh.publish(msg, conversation=conv, msg_id=msg_id)
        return _accepted(sent.id, sent.conversation, str(mtype), sent.subject)

    async def send_to_agent(self, request: Request, body: bytes, principal: str) -> Response:
        agent = wire.agent(request.path_params["agent"])
        mtype = wire.message_type(_type_param(request))
        msg = wire.decode(body, mtype)
        msg_id, conv = wire.idempotent_ids(principal, wire.delivery_key(request.headers, body))
        sent = await self.mesh.send(agent, msg, conversation=conv, msg_id=msg_id)
        return _accepted(sent.id, sent.conversation, str(mtype), sent.subject)

    async def request_agent(self, request: Request, body: bytes, principal: str) -> Response:
        agent = wire.agent(request.path_params["agent"])
        mtype = wire.message_type(_type_param(request))
        msg = wire.decode(body, mtype)
        given = request.query_params.get("timeout") or request.headers.get("x-mesh-timeout")
        timeout = wire.timeout(given, DEFAULT_TIMEOUT)
        try:
            answered = await ask(self.mesh, agent, msg, timeout)
        except TimeoutError:
            late = f"no answer from agent {agent!r} within {timeout:g}s"
            raise wire.Refused(504, "timeout", late) from None
        except RequestFailed as exc:
            status = 422 if exc.kind in ("validation", "decode", "unknown_type") else 502
            raise wire.Refused(status, exc.kind, exc.reason, agent=agent) from None
        except RequestError as exc:
            raise wire.Refused(502, "request_error", str(exc), agent=agent) from None
        return JSONResponse(
            {"conversation": answered.conversation, "type": answered.type, "body": answered.body}
        )

    async def status(self, request: Request, body: bytes, principal: str) -> Response:
        conv = wire.conversation(request.path_params["id"])
        messages = await history.conversation(self.mesh.transport, conv)
        if not messages:
            raise wire.Refused(404, "unknown_conversation", f"no conversation {conv!r} is recorded")
        summary = history.summarize(conv, messages)
        last = next(
            (m for m in reversed(messages) if m.kind in _RESULT_KINDS and m.sender != SENDER),
            None,
        )
        result = None if last is None else {"type": last.type, "id": last.id, "body": last.body()}
        return JSONResponse({**summary.to_dict(), "result": result})

    async def events(self, request: Request, body: bytes, principal: str) -> Response:
        conv = wire.conversation(request.path_params["id"])
        if not self._streams.take():
            raise wire.Refused(503, "busy", f"{MAX_STREAMS} conversations are being followed already")
        return wire.HeldStream(self._sse(conv, request), self._streams)

    async def _sse(self, conv: str, request: Request) -> AsyncIterator[bytes]:
        """Each line as a server-sent event (``event: <type>``, ``id: <message id>``, ``data:``
        the tap line as JSON); a comment every 15 s keeps proxies from closing the stream. The
        subscription lives exactly as long as the response is being sent."""
        queue: asyncio.Queue[TapLine] = asyncio.Queue(maxsize=1024)

        def on_line(line: TapLine) -> None:
            if not queue.full():  # a reader that does not keep up loses lines, never the gateway
                queue.put_nowait(line)

        sub = await history.follow(self.mesh.transport, conv, on_line, full=True)
        try:
            yield b": following\n\n"
            while not await request.is_disconnected():
                try:
                    line = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                data = json.dumps(line.to_dict(), default=str, separators=(",", ":"))
                yield f"event: {line.type or 'message'}\nid: {line.id}\ndata: {data}\n\n".encode()
        finally:
            await sub.unsubscribe()

    async def schema(self, request: Request, body: bytes, principal: str) -> Response:
        return JSONResponse(openapi())


def _type_param(request: Request) -> str:
    name = request.query_params.get("type") or request.headers.get("x-mesh-type")
    if not name:
        raise wire.Refused(400, "missing_type", "say the message type: ?type=<type name>")
    return name


def _accepted(msg_id: str, conversation: str, mtype: str, subject: str) -> JSONResponse:
    body = {"id": msg_id, "conversation": conversation, "type": mtype, "subject": subject}
    return JSONResponse(body, 202, headers={"Location": f"/v1/conversations/{conversation}"})


def _challenge(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": 'Bearer realm="mesh"'} if status == 401 else None
