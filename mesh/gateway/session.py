"""Browser sessions of the web view (docs/gateway.md, "Web view").

A browser cannot send ``Authorization: Bearer`` when it follows a link, so the user pastes a
gateway token once into the login form and gets a session cookie instead:

- the cookie is ``<name>.<expiry>.<nonce>.<HMAC-SHA256>`` under a key made at random when
  the process starts (a restart signs everyone out; it holds no token, only the token's
  name), HttpOnly, SameSite=Strict, Secure when the request came over TLS, for 8 hours;
- a state-changing request (a decision, signing out) must carry the session's CSRF token
  in ``X-CSRF-Token`` (an HMAC of the cookie, which the page reads from ``/ui/api/me``;
  another site can neither read it nor send the cookie) and, when the browser sends an
  ``Origin``, come from this host.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE: Final = "mesh_session"
CSRF_HEADER: Final = "x-csrf-token"
LIFETIME: Final = 8 * 3600  # seconds
MAX_ENDED: Final = 10_000  # signed-out cookies remembered
MAX_CLIENTS: Final = 10_000  # client addresses whose failed sign-ins are counted


@dataclass(frozen=True, slots=True)
class Session:
    name: str  # the token's name: the principal is token:<name>
    expires: int  # seconds since the epoch
    csrf: str

    @property
    def principal(self) -> str:
        return f"token:{self.name}"


class Sessions:
    """Issues and checks session cookies and their CSRF tokens."""

    def __init__(
        self, *, key: bytes | None = None, lifetime: int = LIFETIME, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = key or secrets.token_bytes(32)
        self.lifetime = lifetime
        self._clock = clock
        self._ended: dict[str, int] = {}  # cookies signed out, until they would expire anyway

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}\n{text}".encode(), sha256).hexdigest()

    def issue(self, name: str) -> str:
        """A cookie value for the holder of token `name`."""
        payload = f"{name}.{int(self._clock()) + self.lifetime}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._mac('session', payload)}"

    def read(self, value: str | None) -> Session | None:
        """The session of a cookie value; None if it is missing, forged or expired."""
        if not value or len(value) > 512:
            return None
        payload, _, mac = value.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        name, _, rest = payload.partition(".")
        expires = rest.partition(".")[0]
        if not expires.isdigit() or int(expires) <= self._clock() or mac in self._ended:
            return None
        return Session(name, int(expires), self._mac("csrf", value))

    def end(self, value: str | None) -> None:
        """Sign a cookie out here, not only in the browser that deletes it: a copy of it is
        refused from now on (until it would have expired; a restart ends every session)."""
        session = self.read(value)
        if session is None or value is None:
            return
        now = self._clock()
        for mac, expires in list(self._ended.items()):
            if expires <= now:
                del self._ended[mac]
        if len(self._ended) >= MAX_ENDED:  # a flood of sign-outs: the oldest go first
            self._ended.pop(next(iter(self._ended)))
        self._ended[value.rpartition(".")[2]] = session.expires

    def of(self, request: Request) -> Session | None:
        return self.read(request.cookies.get(COOKIE))

    def may_change(self, request: Request, session: Session) -> bool:
        """Whether a state-changing request carries the session's CSRF token and, when the
        browser names its origin, comes from this host."""
        if not same_origin(request):
            return False
        given = request.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(given.encode(), session.csrf.encode())

    def set_cookie(self, response: Response, value: str, request: Request) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.lifetime,
            path="/",
            secure=_tls(request),
            httponly=True,
            samesite="strict",
        )

    def clear_cookie(self, response: Response, request: Request) -> None:
        response.delete_cookie(COOKIE, path="/", secure=_tls(request), httponly=True, samesite="strict")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from a page of another host."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _tls(request: Request) -> bool:
    return request.url.scheme == "https"


class Attempts:
    """Failed sign-ins per client address: after `limit` within `window` seconds, that
    address is refused until the oldest of them is `window` old, right token or not, so a
    token cannot be guessed at the form's speed. At most `MAX_CLIENTS` addresses are kept
    (the one failing longest ago is forgotten first)."""

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failed: dict[str, list[float]] = {}

    def blocked(self, client: str) -> bool:
        recent = self._recent(client)
        return len(recent) >= self.limit

    def failed(self, client: str) -> None:
        recent = self._recent(client)
        recent.append(self._clock())
        self._failed.pop(client, None)
        self._failed[client] = recent  # now the newest
        while len(self._failed) > MAX_CLIENTS:
            self._failed.pop(next(iter(self._failed)))

    def _recent(self, client: str) -> list[float]:
        now = self._clock()
        return [t for t in self._failed.get(client, []) if now - t < self.window]
