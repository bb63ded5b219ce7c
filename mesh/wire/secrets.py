"""What counts as a secret on the wire and in a URL, and how it is kept out of dead letters
and logs.

A header is secret when its name is a credential header (``Authorization``, cookies), when
its name contains a credential word (``token``, ``secret``, ``password``, ``api-key`` and
their spellings), or when `MESH_SECRET_HEADERS` names it. The mesh's own headers
(``Mesh-*``, ``Nats-*``, trace context) never are: a dead letter needs them to be read and
re-driven.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Final

SECRET_NAMES: Final = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
SECRET_WORDS: Final = (
    "token",
    "secret",
    "password",
    "passwd",
    "api-key",
    "api_key",
    "apikey",
    "credential",
)
_OWN: Final = ("mesh-", "nats-")  # the mesh's and JetStream's headers
_TRACE: Final = frozenset({"traceparent", "tracestate"})

MASK: Final = "***"


def is_secret_header(name: str, configured: Collection[str] = ()) -> bool:
    """Whether a header's value must not be kept: `configured` are lower-case names (the
    `MESH_SECRET_HEADERS` setting)."""
    low = name.lower()
    if low.startswith(_OWN) or low in _TRACE:
        return False
    return low in SECRET_NAMES or low in configured or any(w in low for w in SECRET_WORDS)


def without_secrets(
    headers: Mapping[str, str], configured: Collection[str] = ()
) -> tuple[dict[str, str], list[str]]:
    """The headers without the secret ones, and the names of those left out (sorted)."""
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in headers.items():
        if is_secret_header(name, configured):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, sorted(dropped)


# scheme://userinfo@ where userinfo is user:password, or a lone token (nats://token@host)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:,]*)(?P<pw>:[^\s/@,]*)?@")


def _mask_userinfo(m: re.Match[str]) -> str:
    if m.group("pw") is not None and m.group("user"):  # user:password: the user may be shown
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@"  # a token, or a password without a user


def redact_url(text: str) -> str:
    """`text` with the password (or token) of every URL in it masked:
    ``nats://app:s3cret@n1:4222,nats://tok@n2`` becomes ``nats://app:***@n1:4222,nats://***@n2``.
    Safe on any string: a text without credentials in a URL comes back unchanged."""
    if "@" not in text:
        return text
    return _USERINFO.sub(_mask_userinfo, text)


def scrub(text: str, values: Collection[str]) -> str:
    """`text` with every URL's credentials and every one of `values` (known secrets, such as
    API keys from the environment) masked."""
    for value in values:
        if value and value in text:
            text = text.replace(value, MASK)
    return redact_url(text)
