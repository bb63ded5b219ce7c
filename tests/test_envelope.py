"""Derived message ids: the documented derivation (docs/protocol.md, "Writing an agent"),
the same on every run and in every version, since a re-run after an upgrade must send the
ids the first run sent."""

from __future__ import annotations

import base64
import hashlib
import random

from mesh.wire.envelope import derive_id


def documented(parent: str, agent: str, n: int) -> str:
    """Base32 (RFC 4648, upper case, unpadded) of the 16-byte BLAKE2b of <id>/<agent>/<n>."""
    digest = hashlib.blake2b(f"{parent}/{agent}/{n}".encode(errors="surrogatepass"), digest_size=16)
    return base64.b32encode(digest.digest()).decode().rstrip("=")


def test_derived_ids_follow_the_documented_derivation() -> None:
    rng = random.Random(7)
    parents = ["3RQck3RpF6bJ6uLfTvblB0", "order:17", "ünïcödé", "\udcff", "", "x" * 128]
    parents += [
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 40))) for _ in range(500)
    ]
    for parent in parents:
        for n in (0, 1, 2, rng.randrange(3, 10**6)):
            got = derive_id(parent, "triage", n)
            assert got == documented(parent, "triage", n), (parent, n)
            assert len(got) == 26


def test_a_known_id_stays_the_same() -> None:
    assert derive_id("3RQck3RpF6bJ6uLfTvblB0", "triage", 1) == documented(
        "3RQck3RpF6bJ6uLfTvblB0", "triage", 1
    )
    assert (
        derive_id("3RQck3RpF6bJ6uLfTvblB0", "triage", 1) == "SSNDAEUFULEFYHVB2NWAKTWACU"
    )  # as every earlier version made it
