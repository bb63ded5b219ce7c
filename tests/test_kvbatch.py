"""Batched existence checks against a real KV bucket (the duplicate guard's lookup)."""

from __future__ import annotations

import asyncio

from nats.js.api import KeyValueConfig

from mesh.transport.identities import with_role
from mesh.transport.kvbatch import CHUNK, BatchedExists
from mesh.transport.nats import NatsTransport
from mesh.transport.state import NatsState
from mesh.transport.streams import BucketSpec
from mesh.wire.envelope import new_id
from mesh.wire.settings import Settings


async def test_lookups_made_together_share_one_request_and_see_puts_and_deletes(settings: Settings) -> None:
    transport = await NatsTransport.connect(with_role(settings, "operator"), "kvbatch")  # makes buckets
    try:
        store = await transport.state(BucketSpec(f"T_{new_id()}", 60), settings)
        assert isinstance(store, NatsState)
        await store.put("a.present", b"1")
        await store.put("a.deleted", b"1")
        await store.delete("a.deleted")
        await store.put("a.=hashedKEY", b"1")
        keys = ["a.present", "a.deleted", "a.absent", "a.=hashedKEY"] * 10
        got = await asyncio.gather(*(store.exists(k) for k in keys))
        assert got == [True, False, False, True] * 10
        assert store._exists.requests == 1
        many = [f"b.k{i}" for i in range(CHUNK * 2 + 10)]
        await store.put(many[-1], b"1")
        got = await asyncio.gather(*(store.exists(k) for k in many))
        assert got == [False] * (len(many) - 1) + [True]
        assert store._exists.requests == 1 + 3
    finally:
        await transport.close()


async def test_a_bucket_without_direct_gets_is_asked_one_key_at_a_time(settings: Settings) -> None:
    transport = await NatsTransport.connect(with_role(settings, "operator"), "kvbatch")  # makes buckets
    try:
        name = f"T_{new_id()}"
        await transport.nc.jetstream().create_key_value(KeyValueConfig(bucket=name, direct=False))
        store = await transport.state(BucketSpec(name, 60), settings)
        assert isinstance(store, NatsState)
        await store.put("present", b"1")
        assert await asyncio.gather(store.exists("present"), store.exists("absent")) == [True, False]
        assert store._exists.requests == 0
    finally:
        await transport.close()


async def test_a_batch_no_replica_answers_is_asked_key_by_key_and_the_next_batches_again(
    settings: Settings,
) -> None:
    """A 503 (no responders: on a cluster, the bucket's replicas electing a leader or without a
    quorum; here a bucket that is not there) is no refusal of direct gets: that batch is asked
    key by key, the next one is batched again. Switching for good would leave an agent asking
    one key at a time, and before its permissions allowed that, failing every delivery."""
    transport = await NatsTransport.connect(with_role(settings, "operator"), "kvbatch")
    asked: list[str] = []

    async def one(key: str) -> bool:
        asked.append(key)
        return key == "present"

    batched = BatchedExists(transport.nc, f"T_{new_id()}", one, direct=True)
    try:
        assert await asyncio.gather(batched.exists("present"), batched.exists("absent")) == [True, False]
        assert sorted(asked) == ["absent", "present"] and batched.requests == 1
        assert batched.direct
        assert await batched.exists("present")
        assert batched.requests == 2
    finally:
        await batched.close()
        await transport.close()
