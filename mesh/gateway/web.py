"""The web view (docs/gateway.md, "Web view"): recent conversations, live, and one
conversation as a causal tree that grows as its messages come, with approval buttons for
the people allowed to decide.

=============================================  ==========================================
``GET /ui/``                                    the list of recent conversations
``GET /ui/c/{id}``                              one conversation
``GET|POST /ui/login``, ``POST /ui/logout``     a gateway token for a session cookie
``GET /ui/api/me``                              who is signed in, the CSRF token, powers
``GET /ui/api/conversations[/events]``          recent conversations (JSON; SSE on change)
``GET /ui/api/c/{id}``                          one conversation as a tree (JSON)
``POST /ui/api/approvals/{approval}``           approve or deny a waiting tool call
=============================================  ==========================================

The pages are static files (``mesh/gateway/static``) that build everything with
``textContent``: bodies are shown, never interpreted. A conversation's messages come live
over ``/v1/conversations/{id}/events``, which takes the session cookie on GET.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mesh.gateway import wire
from mesh.gateway.auth import GatewayAuth
from mesh.gateway.session import COOKIE, Attempts, Session, Sessions, same_origin
from mesh.gateway.views import conversation_json
from mesh.observability import history
from mesh.patterns.deciding import decide
from mesh.runtime.client import MeshClient
from mesh.wire.envelope import is_id_token
from mesh.wire.errors import ConfigError, MeshError
from mesh.wire.settings import Settings

if TYPE_CHECKING:
    from mesh.gateway.app import Gateway

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make the forms' Origin null
    "Cache-Control": "no-store",
}
_TYPES: Final = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
log = structlog.get_logger("mesh.gateway")
LOGIN_BYTES: Final = 4096  # a sign-in form's body: a token, at most
DECISION_BYTES: Final = 8192  # an approval decision's body: a reason of 1,000 characters, at most
LIST_EVERY: Final = 1.5  # seconds between readings of the recent conversations
LIST_LIMIT: Final = 50
MAX_WATCHERS: Final = 64  # browsers following the list at once
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class WebConfig:
    """Who may decide approvals from the web view, with which credentials, and where traces are."""

    approvers: frozenset[str] = frozenset()  # token names
    decider_creds: Path | None = None  # operator credentials, used for decisions only
    trace_url: str = ""  # e.g. http://jaeger:16686/trace/{trace_id}

    @classmethod
    def load(
        cls,
        settings: Settings,
        auth: GatewayAuth,
        *,
        approvers: str | None = None,
        decider_creds: Path | None = None,
        trace_url: str | None = None,
    ) -> WebConfig:
        """From the options given, else the settings; a ConfigError says what is inconsistent."""
        names = approvers if approvers is not None else settings.gateway_approvers
        chosen = frozenset(n.strip() for n in names.split(",") if n.strip())
        creds = decider_creds or settings.gateway_decider_creds
        url = trace_url if trace_url is not None else settings.trace_url
        unknown = sorted(chosen - set(auth.tokens))
        if unknown:
            raise ConfigError(f"approvers {', '.join(unknown)} are not names in the gateway's tokens file")
        if bool(chosen) != (creds is not None):
            raise ConfigError(
                "approvals from the web view need both MESH_GATEWAY_APPROVERS (--approvers: token names) "
                "and MESH_GATEWAY_DECIDER_CREDS (--decider-creds: operator credentials, e.g. "
                "`mesh creds role operator`); give both, or neither"
            )
        if creds is not None and not creds.is_file():
            raise ConfigError(f"no credentials file {creds} (MESH_GATEWAY_DECIDER_CREDS)")
        if url and (not url.startswith(("http://", "https://")) or "{trace_id}" not in url):
            raise ConfigError(f"MESH_TRACE_URL={url!r}: give an http(s) URL with {{trace_id}} in it")
        return cls(chosen, creds, url)


class WebView:
    """The pages and their JSON, mounted on a `Gateway`."""

    def __init__(self, gateway: Gateway, config: WebConfig | None = None) -> None:
        self.gateway = gateway
        self.config = config or WebConfig()
        self.sessions = Sessions()
        self.attempts = Attempts()  # failed sign-ins per client address
        self._decider: MeshClient | None = None
        self._files = _static_files()
        self._recent: list[dict[str, Any]] = []
        self._recent_at = 0.0
        self._recent_lock = asyncio.Lock()
        self._recent_reader: history.Recent | None = None
        self._watchers = wire.Slots(MAX_WATCHERS)  # browsers following the list now
        page = self._page
        self.routes = [
            Route("/ui", lambda _: RedirectResponse("/ui/", 308), methods=["GET"]),
            Route("/ui/", page("list.html"), methods=["GET"]),
            Route("/ui/c/{id}", page("conversation.html"), methods=["GET"]),
            Route("/ui/login", page("login.html", signed_in=False), methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", self._api(self.logout), methods=["POST"]),
            Route("/ui/static/{name}", self.static, methods=["GET"]),
            Route("/ui/api/me", self._api(self.me), methods=["GET"]),
            Route("/ui/api/conversations", self._api(self.conversations), methods=["GET"]),
            Route("/ui/api/conversations/events", self._api(self.watch), methods=["GET"]),
            Route("/ui/api/c/{id}", self._api(self.conversation), methods=["GET"]),
            Route("/ui/api/approvals/{approval}", self._api(self.decide), methods=["POST"]),
        ]

    async def start(self) -> None:
        if self.config.decider_creds is not None and self._decider is None:
            creds = self.gateway.settings.model_copy(update={"nats_creds": self.config.decider_creds})
            self._decider = await MeshClient.connect(creds, "gateway")

    async def close(self) -> None:
        if self._decider is not None:
            await self._decider.close()
            self._decider = None

    def session(self, request: Request) -> Session | None:
        """The request's session, if its cookie is good and its token is still known."""
        found = self.sessions.of(request)
        return found if found is not None and found.name in self.gateway.auth.tokens else None

    def may_decide(self, name: str) -> bool:
        return name in self.config.approvers and self._decider is not None

    # -- pages ------------------------------------------------------------------------------

    def _page(self, name: str, *, signed_in: bool = True) -> Handler:
        async def page(request: Request) -> Response:
            if signed_in and self.session(request) is None:
                return RedirectResponse("/ui/login", 303, headers=SECURITY_HEADERS)
            return Response(self._files[name], media_type=_TYPES[".html"], headers=SECURITY_HEADERS)

        return page

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        found = self._files.get(name)
        if found is None or name.endswith(".html"):
            return Response("not found", 404, media_type="text/plain", headers=SECURITY_HEADERS)
        return Response(found, media_type=_TYPES[Path(name).suffix], headers=SECURITY_HEADERS)

    async def login(self, request: Request) -> Response:
        """The form's token for a session cookie; back to the form on a wrong one. The token
        is in the body only (never a URL) and is not logged."""
        client = request.client.host if request.client is not None else ""
        if self.attempts.blocked(client):  # too many wrong tokens from there of late
            return RedirectResponse("/ui/login#throttled", 303, headers=SECURITY_HEADERS)
        try:  # read only so far: anyone may post here, signed in or not
            body = await self.gateway.read_body(request, limit=LOGIN_BYTES)
        except wire.Refused:
            body = b""
        if not body or not same_origin(request):  # no signing in from another site's form
            return RedirectResponse("/ui/login#failed", 303, headers=SECURITY_HEADERS)
        token = parse_qs(body.decode(errors="replace")).get("token", [""])[0].strip()
        principal = self.gateway.auth.bearer(f"Bearer {token}") if token else None
        if principal is None:
            self.attempts.failed(client)
            return RedirectResponse("/ui/login#failed", 303, headers=SECURITY_HEADERS)
        response = RedirectResponse("/ui/", 303, headers=SECURITY_HEADERS)
        self.sessions.set_cookie(response, self.sessions.issue(principal.removeprefix("token:")), request)
        return response

    # -- JSON -------------------------------------------------------------------------------

    def _api(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        """A session cookie (checked for CSRF when the request changes something) or a bearer
        token; errors as JSON."""

        async def api(request: Request) -> Response:
            try:
                response = await handler(request, self._principal(request))
            except wire.Refused as exc:
                response = JSONResponse(exc.body, exc.status)
            except Exception as exc:  # the mesh did not answer: JSON and the headers, all the same
                log.warning("web view request failed", path=request.url.path, error=str(exc))
                failed = {"error": "mesh_unavailable", "detail": "the mesh did not answer; try again"}
                response = JSONResponse(failed, 502)
            response.headers.update(SECURITY_HEADERS)
            return response

        return api

    def _principal(self, request: Request) -> str:
        authorization = request.headers.get("authorization")
        if authorization is not None:
            principal = self.gateway.auth.bearer(authorization)
            if principal is None:
                raise wire.Refused(401, "unauthorized", "a wrong bearer token")
            return principal
        session = self.session(request)
        if session is None:
            raise wire.Refused(401, "unauthorized", "sign in at /ui/login")
        if request.method != "GET" and not self.sessions.may_change(request, session):
            raise wire.Refused(
                403, "csrf", "send the session's X-CSRF-Token (from /ui/api/me), from this site"
            )
        return session.principal

    async def me(self, request: Request, principal: str) -> Response:
        session = self.sessions.of(request)
        name = principal.removeprefix("token:")
        return JSONResponse(
            {
                "principal": principal,
                "csrf": session.csrf if session is not None else "",
                "approver": self.may_decide(name),
                "trace_url": self.config.trace_url,
            }
        )

    async def logout(self, request: Request, principal: str) -> Response:
        response = JSONResponse({"signed_out": principal})
        self.sessions.end(request.cookies.get(COOKIE))
        self.sessions.clear_cookie(response, request)
        return response

    async def _recent_list(self) -> list[dict[str, Any]]:
        """The recent conversations, read at most once each LIST_EVERY for every watcher."""
        async with self._recent_lock:
            if time.monotonic() - self._recent_at >= LIST_EVERY:
                transport = self.gateway.mesh.transport
                if self._recent_reader is None or self._recent_reader.transport is not transport:
                    self._recent_reader = history.Recent(transport)  # kept: later readings take what is new
                found = await self._recent_reader.read(LIST_LIMIT)
                self._recent = [s.to_dict() for s in found]
                self._recent_at = time.monotonic()
            return self._recent

    async def conversations(self, request: Request, principal: str) -> Response:
        return JSONResponse({"conversations": await self._recent_list()})

    async def watch(self, request: Request, principal: str) -> Response:
        if not self._watchers.take():
            raise wire.Refused(503, "busy", f"{MAX_WATCHERS} lists are being followed already")
        return wire.HeldStream(self._list_events(request), self._watchers)

    async def _list_events(self, request: Request) -> AsyncIterator[bytes]:
        """A ``conversations`` event with the whole list each time it changes."""
        sent, quiet = "", 0.0
        yield b": following\n\n"
        while not await request.is_disconnected():
            try:
                data = json.dumps(await self._recent_list(), default=str, separators=(",", ":"))
            except Exception as exc:  # the mesh away a moment: say so, and read again later
                log.warning("recent conversations not read", error=str(exc))
                data = sent
                yield b": the record could not be read; trying again\n\n"
            if data != sent:
                sent, quiet = data, 0.0
                yield f"event: conversations\ndata: {data}\n\n".encode()
            elif quiet >= 15.0:
                quiet = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(LIST_EVERY)
            quiet += LIST_EVERY

    async def conversation(self, request: Request, principal: str) -> Response:
        conv = wire.conversation(request.path_params["id"])
        messages = await history.conversation(self.gateway.mesh.transport, conv)
        return JSONResponse(conversation_json(conv, messages))

    async def decide(self, request: Request, principal: str) -> Response:
        """Approve or deny: ``{"approved": true|false, "reason": "...", "request": "<id of the
        approval.request>"}``. Recorded as decided by the caller's principal."""
        approval = request.path_params["approval"]
        name = principal.removeprefix("token:")
        if self._decider is None or not principal.startswith("token:") or not self.may_decide(name):
            raise wire.Refused(
                403,
                "not_an_approver",
                "this gateway lets only MESH_GATEWAY_APPROVERS decide approvals, and only when it has "
                "MESH_GATEWAY_DECIDER_CREDS (docs/gateway.md, Web view)",
            )
        if not is_id_token(approval):
            raise wire.Refused(400, "invalid_approval", "an approval id is 1-64 of A-Z a-z 0-9 - _")
        try:
            given = json.loads(await self.gateway.read_body(request, limit=DECISION_BYTES) or b"{}")
        except ValueError:
            raise wire.Refused(422, "invalid_json", "the body is not JSON") from None
        if not isinstance(given, dict) or not isinstance(given.get("approved"), bool):
            raise wire.Refused(422, "invalid_body", 'say {"approved": true} or {"approved": false}')
        reason, cause = str(given.get("reason", ""))[:1000], str(given.get("request", ""))
        approved = given["approved"]
        try:
            st = await decide(
                self._decider,
                self._decider_settings(),
                approval,
                approved=approved,
                by=principal,
                reason=reason or ("" if approved else f"denied in the web view by {principal}"),
                causation=cause if is_id_token(cause) else "",
            )
        except MeshError as exc:
            raise wire.Refused(409, "not_waiting", str(exc)) from None
        verdict = "approved" if approved else "denied"
        return JSONResponse({"approval": approval, "decision": verdict, "agent": st.agent, "tool": st.tool})

    def _decider_settings(self) -> Settings:
        return self.gateway.settings.model_copy(update={"nats_creds": self.config.decider_creds})


def _static_files() -> dict[str, bytes]:
    folder = resources.files("mesh.gateway") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if Path(f.name).suffix in _TYPES}
