"""Signing as publish middleware: every message out carries its sender's signature.

It must be the last middleware of a chain (the innermost): it signs the headers as they
are when it runs, so anything that edits them afterwards breaks the signature. What is
signed, and how a receiver checks it: `mesh.wire.signature`, docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

from mesh.middleware.publish import Outgoing, PublishMiddleware, Send
from mesh.wire.signature import Signer


def signing(signer: Signer) -> PublishMiddleware:
    """A publish middleware that signs every message with `signer`."""

    def wrap(call_next: Send) -> Send:
        async def send(out: Outgoing) -> Any:
            signer.sign(out.subject, out.headers, out.data)
            return await call_next(out)

        return send

    return wrap
