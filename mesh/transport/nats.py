"""The NATS implementation of `Transport` (mesh.transport.base).

nats-py is used only here and in the modules beside it: `natsclient` (the client itself),
`consumer` (pulls), `outbox` (stores acknowledged together), `state` and `kvbatch` (KV
buckets), `reading` (stored messages in batches). A delivery is anything with ``subject``,
``data``, ``headers`` and ``reply``."""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from mesh.transport.auth import client_options
from mesh.transport.base import DeliveryHandler, RawHandler, StoredHandler, Subscription
from mesh.transport.consumer import PullConsumer
from mesh.transport.delivery import Direct
from mesh.transport.identities import refuse_anonymous
from mesh.transport.jetstream import (
    JS_DUPLICATE_IN_PROCESS,
    JS_STORE_FAILED,
    JS_STREAM_NAME_IN_USE,
    NO_LEADER,
    edit_command,
    limits_differ,
    stream_api_errors,
)
from mesh.transport.natsclient import (
    MAX_CONTROL_LINE,
    Client,
    Refused,
    connect_or_refuse,
    header_bytes,
    is_refusal,
    refused_by,
    with_text_headers,
)
from mesh.transport.outbox import Acks, Outbox, Pipelined
from mesh.transport.reading import stored_batch, stream_bounds
from mesh.transport.server import resolve_url
from mesh.transport.state import NatsState, StateStore
from mesh.transport.streams import BucketSpec, ConsumerSpec, StreamSpec, stream_specs
from mesh.wire.envelope import NATS_MSG_ID
from mesh.wire.errors import PublishError, ServerError, ServerUnavailable, StreamFull
from mesh.wire.secrets import redact_url
from mesh.wire.settings import Settings

log = structlog.get_logger("mesh.transport.nats")

ACK_TIMEOUT = 5.0  # seconds one attempt of a durable publish waits for the stream's ack
RETRY_DELAY = 0.1  # seconds before the first retry of a durable publish; doubles, ±20 %
RETRY_DELAY_MAX = 2.0
REFUSED_ATTEMPTS = 3  # connects refused for the credentials before giving up (a reload may race)
REFUSED_DELAY = 0.25


_DENIED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


class NatsTransport:
    """`Transport` over nats-py."""

    def __init__(self, nc: NatsClient, settings: Settings | None = None) -> None:
        self.nc = nc
        self.settings = settings or Settings.load(environ={})
        self._js = nc.jetstream()
        self._streams_ready = False
        self.unbatched: set[str] = set()  # streams that refused batched reads (mesh.transport.reading)
        self.closed = asyncio.Event()  # set when the connection is closed for good
        self._closing = False
        self.publish_retries = 0  # durable publishes sent again (see `store`)
        self.refused: set[str] = set()  # subjects the server refused this identity (lower case)
        self._acks = Acks(nc)  # acknowledgements of stores no one waits for yet (outbox)

    @property
    def max_payload(self) -> int:
        """The most the server takes in one message, headers and body together."""
        return int(self.nc.max_payload)

    def check_outgoing(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Refuse, with a PublishError, what the server would answer by closing the
        connection: a control line over 4 KiB or a message over its max_payload."""
        room = self.nc.max_payload
        rough = len(data) + (0 if not headers else sum(map(len, headers)) + sum(map(len, headers.values())))
        if len(subject) + len(reply) < 1024 and rough < room - 4096:
            return  # the common case, without encoding anything
        line = len(subject.encode()) + len(reply.encode()) + 200  # HPUB, sizes, a JetStream reply inbox
        if line > MAX_CONTROL_LINE:
            raise PublishError(
                f"subject {subject[:80]!r}... is {len(subject.encode())} bytes: with its reply subject "
                f"it would not fit the server's {MAX_CONTROL_LINE}-byte control line"
            )
        size = len(data) + header_bytes(headers)
        if size > room:
            raise PublishError(
                f"message to {subject[:120]!r} is {size} bytes with its headers; the server takes "
                f"at most {room} (max_payload)"
            )

    @classmethod
    async def connect(cls, settings: Settings, name: str, *, url: str | None = None) -> NatsTransport:
        servers = [s.strip() for s in (url or resolve_url(settings)).split(",") if s.strip()]
        shown = redact_url(", ".join(servers))  # what errors say: no password

        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if transport is None and is_refusal(exc):
                if not refused.done():
                    refused.set_result(str(exc))
                return
            denied = _DENIED_PUBLISH.search(str(exc))
            if transport is not None and denied:
                transport.refused.add(denied.group(1).lower())
            log.warning("nats error", error=str(exc))

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected", url=transport.connected_url if transport is not None else "")

        transport: NatsTransport | None = None

        async def on_closed() -> None:
            if transport is not None:
                transport.closed.set()
                if not transport._closing:
                    log.error("nats connection closed", error=str(nc.last_error or ""))

        options: dict[str, Any] = {
            "servers": servers,
            "name": name,
            "connect_timeout": settings.connect_timeout,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            "closed_cb": on_closed,
        }
        refuse_anonymous(settings, servers)
        options.update(client_options(settings))  # its identity and TLS
        nc = Client()
        try:
            for attempt in range(REFUSED_ATTEMPTS):
                try:
                    await connect_or_refuse(nc, options, refused, settings.connect_timeout * 2)
                    break
                except Refused:
                    # a connection that arrives while the server reloads its users can be
                    # refused though its key is valid: try again shortly, a few times
                    if attempt == REFUSED_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(REFUSED_DELAY)
                    nc = Client()
                    refused = asyncio.get_running_loop().create_future()
        except Refused as exc:
            raise refused_by(str(exc), shown, settings) from None
        except TimeoutError:
            raise ServerError(
                f"no answer from NATS at {shown} within {settings.connect_timeout * 2:.0f}s. "
                f"Is the server up? Start one with `mesh up`, or fix MESH_NATS_URL"
            ) from None
        except (OSError, ValueError, nats.errors.Error) as exc:
            raise ServerError(
                f"cannot connect to NATS at {shown}: {redact_url(str(exc)) or type(exc).__name__}. "
                f"Check MESH_NATS_URL (nats://host:port[,nats://host:port]) and MESH_NATS_CREDS"
            ) from None
        transport = cls(nc, settings)
        return transport

    @property
    def connected_url(self) -> str:
        """The server this connection uses, to show: without a password or token."""
        u = self.nc.connected_url
        return f"nats://{u.hostname}:{u.port}" if u else ""  # never the user part: it may hold a password

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        self.check_outgoing(subject, reply, data, headers)
        await self.nc.publish(subject, data, reply=reply, headers=headers)

    async def subscribe(self, subject: str, handler: RawHandler, queue: str = "") -> Subscription:
        sub = await self.nc.subscribe(subject, queue=queue, cb=handler)
        return sub

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    async def listen(self, subject: str, handler: DeliveryHandler, queue: str = "") -> Subscription:
        async def deliver(msg: Any) -> None:
            await handler(Direct(msg.subject, msg.data, msg.headers, msg.reply))

        sub = await self.nc.subscribe(subject, queue=queue, cb=deliver)
        return sub

    async def request(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Any:
        return await self.nc.request(subject, data, timeout=timeout, headers=headers)

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish to a stream and wait for its acknowledgement, retrying while the stream
        cannot answer (no acknowledgement in time, no leader, no quorum) within
        MESH_PUBLISH_RETRY_ATTEMPTS and MESH_PUBLISH_RETRY_TIMEOUT. Every attempt sends the same
        headers, so the same Nats-Msg-Id: the stream keeps one copy even if an attempt that timed
        out was stored."""
        self.check_outgoing(subject, "", data, headers)
        limits = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + limits.publish_retry_timeout
        ensured = self._streams_ready
        attempt = 0
        while True:
            attempt += 1
            timeout = max(0.05, min(ACK_TIMEOUT, deadline - loop.time()))
            try:
                if not ensured:
                    # A publisher may be first on a new server; and without the stream, a
                    # subscriber on the subject (a tap) would swallow the store request.
                    await asyncio.wait_for(self.ensure_streams(), timeout)
                    ensured = True
                ack = await self._js.publish(subject, data, timeout=timeout, headers=headers)
                return int(ack.seq)
            except nats.js.errors.NoStreamResponseError:
                ensured = False  # no leader, or no stream at all: check the streams first next time
                why = f"no stream leader answered. {NO_LEADER}"
            except TimeoutError:  # nats-py's, or the wait for the streams
                if subject.lower() in self.refused:
                    raise PublishError(
                        f"the server refused to let this identity publish to {subject!r} (permissions "
                        f"violation): agents and the publisher role may send to inboxes, direct lines and "
                        f"events, approval decisions need the operator; see docs/security.md"
                    ) from None
                why = f"no answer within {timeout:.1f}s. {NO_LEADER}, or the server is down or overloaded"
            except nats.js.errors.ServiceUnavailableError as exc:
                if exc.err_code == JS_STORE_FAILED and "maximum" in (exc.description or ""):
                    raise StreamFull(
                        f"{subject!r} was not stored: the stream is full ({exc.description}). It holds "
                        f"what agents have not handled yet, within MESH_STREAM_MAX_BYTES and, per agent "
                        f"and conversation, MESH_STREAM_MAX_MSGS_PER_SUBJECT: start or scale the agent "
                        f"it is for, or raise the stream's limits (docs/operations.md#limits)"
                    ) from None
                why = f"JetStream answered 503 ({exc.description or 'unavailable'}). {NO_LEADER}"
            except nats.js.errors.APIError as exc:
                if exc.err_code != JS_DUPLICATE_IN_PROCESS:
                    raise
                why = f"an earlier attempt is not yet stored or refused. {NO_LEADER}"
            except ServerUnavailable as exc:
                why = str(exc)
            elapsed = loop.time() - started
            if attempt >= limits.publish_retry_attempts or loop.time() >= deadline:
                msg_id = (headers or {}).get(NATS_MSG_ID) or "unset"
                raise ServerUnavailable(
                    f"{subject!r} was not stored after {attempt} attempt(s) in {elapsed:.1f}s; the last: "
                    f"{why}. Once the servers are back, publish it again with the same message id "
                    f"({NATS_MSG_ID} {msg_id}) within MESH_DEDUPE_WINDOW: an attempt that timed out may "
                    f"have been stored, and the stream keeps one copy. MESH_PUBLISH_RETRY_ATTEMPTS and "
                    f"MESH_PUBLISH_RETRY_TIMEOUT set how long to retry"
                ) from None
            self.publish_retries += 1
            (log.warning if attempt == 1 else log.info)(
                "durable publish retried", subject=subject, attempt=attempt, reason=why
            )
            delay = min(RETRY_DELAY_MAX, RETRY_DELAY * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))

    def outbox(self) -> Outbox:
        return Pipelined(self, self._acks)

    @property
    def streams_ready(self) -> bool:
        """Whether this connection made sure the mesh's streams exist (`ensure_streams`)."""
        return self._streams_ready

    async def ensure_streams(self) -> None:
        """Create every mesh stream that is missing (agents and `mesh up` call this)."""
        for spec in stream_specs(self.settings):
            await self.ensure_stream(spec, self.settings)
        self._streams_ready = True

    async def ensure_stream(self, spec: StreamSpec, settings: Settings) -> None:
        config = StreamConfig(
            name=spec.name,
            subjects=spec.subjects,
            retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY if settings.storage == "memory" else StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=spec.max_age,
            duplicate_window=spec.dedupe_window,
            max_bytes=spec.max_bytes or -1,
            max_msgs_per_subject=spec.max_msgs_per_subject or -1,
            discard=DiscardPolicy.NEW if spec.discard_new else DiscardPolicy.OLD,
            discard_new_per_subject=spec.discard_new and spec.max_msgs_per_subject > 0,
            deny_delete=spec.append_only,
            deny_purge=spec.append_only,
            allow_direct=spec.direct,
        )
        # With credentials, look first: an identity that may not create streams (an agent
        # under auth, docs/security.md) only checks that they exist. Without, create at
        # once: on a cluster without a meta leader that is refused quickly and says so,
        # where a look would wait for its timeout.
        if settings.nats_creds is not None:
            with stream_api_errors(
                spec.name, "about", ", or this identity may not read it (MESH_NATS_CREDS)"
            ):
                try:  # and say so if it has other limits, as when it is made below
                    return await self._check_limits(spec, (await self._js.stream_info(spec.name)).config)
                except nats.js.errors.NotFoundError:
                    pass
        with stream_api_errors(spec.name, "to create or check"):
            try:
                await self._js.add_stream(config)
            except BadRequestError as exc:
                # 10058: the stream exists with another config (an operator's choice: keep it);
                # 10065: another stream already captures these subjects, so they are stored.
                if exc.err_code not in (JS_STREAM_NAME_IN_USE, 10065):
                    raise
                log.debug("stream kept as configured", stream=spec.name, code=exc.err_code)
                if exc.err_code == JS_STREAM_NAME_IN_USE:
                    await self._check_limits(spec)

    async def _check_limits(self, spec: StreamSpec, config: Any = None) -> None:
        """Say so when a stream that exists has other limits than these settings ask for: it
        was made by an older version, with other settings, or edited by an operator. It is
        kept as it is (changing it here could drop stored work, and replicas with different
        settings would undo each other's changes); the warning says how to change it."""
        try:
            config = config or (await self._js.stream_info(spec.name)).config
        except Exception as exc:  # only a warning is at stake
            log.debug("stream limits not checked", stream=spec.name, error=str(exc))
            return
        differ = limits_differ(spec, config)
        if differ:
            log.warning(
                "stream limits differ from the settings; the stream is kept as it is",
                stream=spec.name,
                differ=differ,
                fix=edit_command(spec),
            )

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        # One filter goes in the API subject (CONSUMER.CREATE.<stream>.<name>.<filter>), which
        # the server checks against the request: an agent may create its own consumers only
        # with its own filter (mesh.transport.auth). Several cannot; an agent under auth finds
        # that consumer made for it when its identity was issued (`mesh creds`).
        single = spec.filters[0] if len(spec.filters) == 1 else None
        config = ConsumerConfig(
            name=spec.name,
            durable_name=spec.name,
            filter_subject=single,
            filter_subjects=None if single else spec.filters,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW if spec.deliver_new else DeliverPolicy.ALL,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            max_waiting=512,
        )
        if single is None and await self._consumer_is(spec):
            return
        try:
            await self._js.add_consumer(spec.stream, config)
        except nats.errors.TimeoutError:
            if not any(s.startswith(f"$js.api.consumer.create.{spec.stream.lower()}.") for s in self.refused):
                raise
            raise ServerError(
                f"this identity may not create or change consumer {spec.name} on {spec.stream} with filters "
                f"{', '.join(spec.filters)}: an agent creates only consumers with its own single filter. "
                f"Give the agent the MESH_ACK_WAIT, MESH_MAX_DELIVER and MESH_MAX_ACK_PENDING the consumer "
                f"has, or have the operator make it (remove it, then `mesh agents add`)"
            ) from None

    async def _consumer_is(self, spec: ConsumerSpec) -> bool:
        """Whether the consumer exists as `spec` describes it."""
        try:
            c = (await self._js.consumer_info(spec.stream, spec.name)).config
        except nats.js.errors.NotFoundError:
            return False
        return (
            sorted(c.filter_subjects or [c.filter_subject or ">"]) == sorted(spec.filters)
            and c.ack_wait == spec.ack_wait
            and c.max_deliver == spec.max_deliver
            and c.max_ack_pending == spec.max_ack_pending
        )

    async def consume(self, spec: ConsumerSpec, handler: StoredHandler, capacity: int) -> PullConsumer:
        consumer = PullConsumer(self.nc, spec.stream, spec.name, handler, capacity=capacity)
        await consumer.start()
        return consumer

    async def consumer_info(self, stream: str, name: str) -> Any:
        return await self._js.consumer_info(stream, name)

    async def consumers(self, stream: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        while True:
            try:
                page = await self._js.consumers_info(stream, offset=len(found))
            except nats.js.errors.NotFoundError:
                return found  # no such stream yet
            for info in page:
                config = info.config
                found[info.name] = list(config.filter_subjects or []) or [config.filter_subject or ">"]
            if not page:
                return found

    async def stored(self, stream: str, seq: int) -> Any:
        return with_text_headers(await self._js.get_msg(stream, seq))

    async def stored_next(self, stream: str, seq: int, subject: str) -> Any | None:
        try:
            return with_text_headers(await self._js.get_msg(stream, seq=seq, subject=subject, next=True))
        except nats.js.errors.NotFoundError:
            return None

    async def stored_many(self, stream: str, seq: int, subject: str, batch: int = 256) -> list[Any]:
        return await stored_batch(self, stream, seq, subject, batch)

    async def stream_bounds(self, stream: str) -> tuple[int, int]:
        return await stream_bounds(self._js, stream)

    async def stored_last(self, stream: str, subject: str) -> Any | None:
        try:
            return with_text_headers(await self._js.get_last_msg(stream, subject))
        except nats.js.errors.NotFoundError:
            return None

    async def delete_stored(self, stream: str, seq: int) -> None:
        await self._js.delete_msg(stream, seq)

    async def state(self, bucket: BucketSpec, settings: Settings) -> StateStore:
        try:
            kv = await self._bucket(bucket.name, settings)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=bucket.name,
                history=1,
                ttl=bucket.ttl,
                storage=StorageType.MEMORY if settings.storage == "memory" else StorageType.FILE,
                replicas=settings.replicas,
                direct=True,  # reads from any replica, and batched lookups (mesh.transport.kvbatch)
            )
            try:
                kv = await self._js.create_key_value(config)
            except BadRequestError:
                kv = await self._js.key_value(bucket.name)  # a replica created it meanwhile
        return NatsState(self.nc, kv, bucket.name)

    async def _bucket(self, name: str, settings: Settings) -> Any:
        """An existing bucket, asked again while JetStream is slow (MESH_PUBLISH_RETRY_TIMEOUT)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.publish_retry_timeout
        while True:
            try:
                return await self._js.key_value(name)
            except nats.errors.TimeoutError:
                if loop.time() >= deadline:
                    raise ServerUnavailable(
                        f"JetStream did not answer in time when asked for bucket {name}: on a cluster, "
                        f"its servers may be electing a leader, or too few are up for a quorum"
                    ) from None
                log.warning("no answer for bucket, asking again", bucket=name)
                await asyncio.sleep(RETRY_DELAY)

    async def flush(self, timeout: float = 5.0) -> None:
        await self.nc.flush(timeout)  # type: ignore[arg-type]

    @property
    def is_connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        self._closing = True
        if self.nc.is_reconnecting or self.nc.is_connecting:
            await self.nc.close()  # nothing to drain while the server is gone
        elif not self.nc.is_closed:
            await self.nc.drain()
