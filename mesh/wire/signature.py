"""Signed envelopes: who sent a message, proven with the sender's NKEY.

A sender signs a canonical form of the subject, the mesh headers that decide what a message
is and where its answer goes, and the body, with the Ed25519 key of its NATS identity (the
seed in its credentials file), and sends the signature and its public key along:

    Mesh-Signer:    the signer's public key, as NATS writes it (``U...``, 56 characters)
    Mesh-Signature: the 64-byte Ed25519 signature, base64url without padding (86 characters)

The canonical form (`canonical`) is UTF-8 lines joined by ``\\n``: the tag ``mesh-sig-v1``,
the subject, the value of each header of `SIGNED` in that order (an empty line for one that
is absent), and the lower-case hex SHA-256 of the body. NATS header values and subjects hold
no line breaks, so the lines cannot be shifted into one another. docs/protocol.md
describes it for other languages.

A reply target travels with a grant: whoever sets ``Mesh-Reply-To`` (or asks over a direct
line, with a NATS reply subject) in its own reply space adds

    Mesh-Reply-Grant: <its public key>.<signature over "mesh-reply-v1\n<conversation>">

and an agent that passes the work on copies it unchanged. A receiver accepts a reply target
only in the reply space of the message's signer or of a valid grant's signer
(`mesh.runtime.verify`): an agent in the middle of a conversation cannot point an answer at
anyone who did not ask for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from functools import lru_cache
from typing import Final

import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped]

from mesh.wire import envelope as h

SIGNER: Final = "Mesh-Signer"
SIGNATURE: Final = "Mesh-Signature"
TAG: Final = "mesh-sig-v1"
REPLY_GRANT: Final = h.REPLY_GRANT
GRANT_TAG: Final = "mesh-reply-v1"
GRANT_LEN: Final = h.GRANT_LEN
_GRANTS_KEPT: Final = 1024  # conversations whose grant a signer keeps ready

SIGNED: Final = (
    h.TYPE,
    h.VERSION,
    h.ID,
    h.SENDER,
    h.CONVERSATION,
    h.CAUSATION,
    h.HOP,
    h.DEPTH,
    h.DEADLINE,
    h.JOIN,
    h.ANSWER,
    h.REPLY_TO,
    h.ROUTE,
    h.GATHERS,
    h.SENT_AT,
    h.CONTENT_TYPE,
)


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class BadSignature(Exception):
    """The signature is missing, malformed or does not match; the message says which."""


def canonical(subject: str, headers: dict[str, str], body: bytes) -> bytes:
    """What is signed: the subject, the `SIGNED` headers in order, the body's digest."""
    lines = [TAG, subject, *(headers.get(name, "") for name in SIGNED), hashlib.sha256(body).hexdigest()]
    return "\n".join(lines).encode()


class Signer:
    """Signs with one identity's seed (``SU...``)."""

    def __init__(self, seed: bytes) -> None:
        kp = nkeys.from_seed(bytearray(seed))
        self.public_key: str = kp.public_key.decode()
        self._key: nacl.signing.SigningKey = kp._keys  # the Ed25519 key nkeys decoded
        self._grants: dict[str, str] = {}

    def sign(self, subject: str, headers: dict[str, str], body: bytes) -> None:
        """Add `SIGNER` and `SIGNATURE` to `headers`, over the headers as they are now."""
        headers[SIGNER] = self.public_key
        raw = self._key.sign(canonical(subject, headers, body)).signature
        headers[SIGNATURE] = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def grant(self, conversation: str) -> str:
        """The `REPLY_GRANT` value that lets answers in `conversation` reach this identity's
        reply space whoever passes the work on (one signature per conversation, kept)."""
        value = self._grants.get(conversation)
        if value is None:
            raw = self._key.sign(_grant_text(conversation)).signature
            value = f"{self.public_key}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"
            if len(self._grants) >= _GRANTS_KEPT:
                self._grants.clear()
            self._grants[conversation] = value
        return value


def _grant_text(conversation: str) -> bytes:
    return f"{GRANT_TAG}\n{conversation}".encode()


def check_grant(value: str, conversation: str) -> str:
    """The public key that signed the reply grant `value` for `conversation`;
    `BadSignature` if it is malformed, for another conversation, or forged."""
    if len(value) != GRANT_LEN or value[56] != ".":
        raise BadSignature(f"{REPLY_GRANT} is not <public key>.<signature> ({GRANT_LEN} characters)")
    key, signature = value[:56], value[57:]
    _check(_verify_key(key), _grant_text(conversation), signature, REPLY_GRANT)
    return key


@lru_cache(maxsize=4096)
def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    """The Ed25519 key in a NATS user public key: base32 of prefix, 32 key bytes, CRC16."""
    if len(public_key) != 56 or not public_key.startswith("U"):
        raise BadSignature("Mesh-Signer is not a NATS user public key (U..., 56 characters)")
    try:
        raw = base64.b32decode(public_key)
    except (binascii.Error, ValueError):
        raise BadSignature("Mesh-Signer is not base32") from None
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if body[0] != nkeys.PREFIX_BYTE_USER or nkeys.crc16(bytearray(body)) != crc:
        raise BadSignature("Mesh-Signer has a wrong prefix or checksum")
    return nacl.signing.VerifyKey(bytes(body[1:]))


def verify(subject: str, headers: dict[str, str], body: bytes) -> str:
    """The signer's public key, if `headers` carry a valid signature over this message;
    `BadSignature` otherwise."""
    signer, signature = headers.get(SIGNER, ""), headers.get(SIGNATURE, "")
    if not signer or not signature:
        raise BadSignature("the message is not signed (no Mesh-Signer or Mesh-Signature)")
    _check(_verify_key(signer), canonical(subject, headers, body), signature, SIGNATURE)
    return signer


def _check(key: nacl.signing.VerifyKey, text: bytes, signature: str, header: str) -> None:
    if len(signature) != 86 or _BASE64URL.fullmatch(signature) is None:
        # the decoder skips characters outside the alphabet: checked first, so what is
        # verified is always 64 bytes
        raise BadSignature(f"{header} is not 64 bytes of base64url (86 characters of A-Z a-z 0-9 - _)")
    raw = base64.urlsafe_b64decode(signature + "==")
    try:
        key.verify(text, raw)
    except nacl.exceptions.BadSignatureError:
        if header == SIGNATURE:
            raise BadSignature("the signature does not match the subject, headers and body") from None
        raise BadSignature(f"{header} does not match this conversation: made for another or forged") from None
