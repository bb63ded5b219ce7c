"""Who may call the gateway: bearer tokens, or HMAC-signed webhook bodies (docs/gateway.md).

Both come from files of ``name=secret`` lines (blank lines and ``#`` comments skipped):

- tokens (``--tokens``, MESH_GATEWAY_TOKENS): ``Authorization: Bearer <token>``;
- webhook secrets (``--secrets``, MESH_GATEWAY_SECRETS): the caller names its source in the
  URL (``?source=github``) and signs the raw body as GitHub does,
  ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body under that source's secret>``,
  or with a timestamp as Stripe does, ``Stripe-Signature: t=<unix seconds>,v1=<hex
  HMAC-SHA256 of "<t>.<body>">``, good for `TOLERANCE` seconds.

Every comparison is constant-time. The caller that passed is a principal (``token:<name>``,
``hmac:<source>``): idempotency keys are scoped to it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from mesh.wire.errors import ConfigError

SIGNATURE_HEADER: Final = "x-hub-signature-256"
SIGNATURE_PREFIX: Final = "sha256="
TIMESTAMPED_HEADER: Final = "stripe-signature"  # t=<unix seconds>,v1=<hex HMAC of "<t>.<body>">
TOLERANCE: Final = 300  # seconds a timestamped signature stays good, at most
FUTURE_SKEW: Final = 30  # seconds a sender's clock may run ahead of ours
_MAX_SIGNATURE_HEADER: Final = 1024
TOKENS_ENV: Final = "MESH_GATEWAY_TOKENS"
SECRETS_ENV: Final = "MESH_GATEWAY_SECRETS"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_MIN_SECRET = 16  # characters: a token or secret shorter than this is refused at load


@dataclass(frozen=True)
class GatewayAuth:
    """Named bearer tokens and named webhook secrets."""

    tokens: Mapping[str, bytes] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(
        cls, tokens: Path | None = None, secrets: Path | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayAuth:
        """From the files given, else from the files MESH_GATEWAY_TOKENS / _SECRETS name.
        With neither, a ConfigError: the gateway never runs open."""
        env = os.environ if environ is None else environ
        tokens = tokens or (Path(env[TOKENS_ENV]) if env.get(TOKENS_ENV) else None)
        secrets = secrets or (Path(env[SECRETS_ENV]) if env.get(SECRETS_ENV) else None)
        auth = cls(
            tokens=read_pairs(tokens) if tokens else {},
            secrets=read_pairs(secrets) if secrets else {},
        )
        if not auth.tokens and not auth.secrets:
            raise ConfigError(
                "the gateway needs callers to authenticate: give --tokens FILE and/or --secrets FILE "
                f"(or {TOKENS_ENV} / {SECRETS_ENV}), each of name=secret lines (docs/gateway.md)"
            )
        return auth

    def bearer(self, authorization: str) -> str | None:
        """The principal of an ``Authorization: Bearer <token>`` value; None if it is no
        known token. Every token is compared, so the time taken says nothing of which matched."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found = None
        for name, known in self.tokens.items():
            if hmac.compare_digest(given, known):
                found = name
        return f"token:{found}" if found is not None else None

    def signed(self, source: str, signature: str, body: bytes) -> str | None:
        """The principal of a body signed under `source`'s secret; None if the source is
        unknown or the signature does not match."""
        secret = self.secrets.get(source)
        if secret is None or not signature.startswith(SIGNATURE_PREFIX):
            return None
        expected = sign(secret, body)
        given = signature[len(SIGNATURE_PREFIX) :].strip().lower()
        ok = hmac.compare_digest(given.encode(), expected.encode())
        return f"hmac:{source}" if ok else None

    def timestamped(
        self, source: str, header: str, body: bytes, now: float, window: float = TOLERANCE
    ) -> str | None:
        """The principal of a body signed with a timestamp under `source`'s secret, Stripe's
        scheme: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` (several ``v1``
        while a secret is rotated). None if the source is unknown, the header malformed,
        the time more than `window` seconds before ours or `FUTURE_SKEW` after it, or no
        ``v1`` matches. `window` must end before the stream forgets the delivery's id (see
        `window_for`), or a replay after that would be a new message."""
        secret = self.secrets.get(source)
        if secret is None or len(header) > _MAX_SIGNATURE_HEADER:
            return None
        stamp, given = signature_parts(header)
        if stamp is None or not -FUTURE_SKEW <= now - stamp <= window or not given:
            return None
        expected = sign(secret, f"{stamp}.".encode() + body).encode()
        ok = False
        for candidate in given:  # every one compared: the time says nothing of which matched
            ok |= hmac.compare_digest(candidate.encode(), expected)
        return f"hmac:{source}" if ok else None


def window_for(dedupe_window: float) -> float:
    """How old a timestamped signature may be: `TOLERANCE`, or less, so that the stream still
    remembers a delivery's id (MESH_DEDUPE_WINDOW) for as long as its signature is good,
    even when it was first received `FUTURE_SKEW` before its own time."""
    return min(TOLERANCE, dedupe_window - FUTURE_SKEW)


def signature_parts(header: str) -> tuple[int | None, list[str]]:
    """The timestamp and the ``v1`` signatures of a timestamped signature header (at most
    eight); (None, []) when there is no timestamp of up to 12 digits."""
    stamp: int | None = None
    given: list[str] = []
    for item in header.split(",")[:16]:
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit() and len(value) <= 12:
            stamp = int(value)
        elif key == "v1" and len(given) < 8:
            given.append(value.strip().lower())
    return (stamp, given) if stamp is not None else (None, [])


def sign(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 of `body` (what goes after ``sha256=``)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def read_pairs(path: Path) -> dict[str, bytes]:
    """``name=secret`` lines; a ConfigError names the line that is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    out: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = (part.strip() for part in line.partition("="))
        if not sep or not _NAME.match(name):
            raise ConfigError(f"{path}:{n}: write name=secret, the name of a-z, 0-9, '-' or '_'")
        if len(secret) < _MIN_SECRET:
            raise ConfigError(f"{path}:{n}: the secret of {name!r} is shorter than {_MIN_SECRET} characters")
        if name in out:
            raise ConfigError(f"{path}:{n}: {name!r} is given twice")
        out[name] = secret.encode()
    return out
