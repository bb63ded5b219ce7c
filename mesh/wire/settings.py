"""Process settings, read once from ``MESH_*`` environment variables and validated at start-up."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.wire.errors import ConfigError
from mesh.wire.secrets import MASK, redact_url

PREFIX = "MESH_"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an HTTP/NATS header name token
_SECRET_FIELDS = frozenset({"qdrant_api_key"})  # never echoed in an error


def _default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mesh"


class Settings(BaseModel):
    """Everything a mesh process can be configured with. Build it with `Settings.load()`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str | None = Field(
        default=None,
        repr=False,  # may carry a password (nats://user:password@host)
        description="NATS server URL(s), comma-separated for a cluster. Unset: use the server "
        "that `mesh up` started under the data dir.",
    )
    nats_creds: Path | None = Field(default=None, description="NATS credentials file.")
    nats_tls_ca: Path | None = Field(
        default=None,
        description="CA certificate file (PEM) to verify a NATS server's TLS certificate with; unset: "
        "the system's trust store, when the server asks for TLS.",
    )
    nats_tls_cert: Path | None = Field(
        default=None, description="Client certificate (PEM) for a NATS server that asks for one (mutual TLS)."
    )
    nats_tls_key: Path | None = Field(default=None, description="The client certificate's private key (PEM).")
    insecure: bool = Field(
        default=False,
        description="Connect without credentials, to a NATS server that requires none. Off: a "
        "process without an identity refuses to start (docs/security.md).",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the embedded server keeps its store, state file, logs and traces.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    trace_exporter: Literal["auto", "otlp", "file", "console", "none"] = Field(
        default="auto",
        description="auto: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else a JSON-lines file.",
    )
    trace_sample: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of new traces recorded (parent-based: a message whose trace was sampled "
        "upstream is recorded, one that was not is not). 1.0 records every trace; 0.1 is the "
        "recommendation for production traffic.",
    )
    trace_file: Path | None = Field(
        default=None, description="Span file for the file exporter (default: <data_dir>/traces.jsonl)."
    )
    metrics_port: int = Field(
        default=0,
        description="TCP port of each agent process's Prometheus scrape endpoint (/metrics); 0: none. "
        "Replicas on one host each need their own (docs/operations.md#metrics).",
    )
    metrics_host: str = Field(
        default="0.0.0.0", min_length=1, description="Address the metrics endpoint listens on."
    )
    max_message_bytes: int = Field(default=1 << 20, gt=0, description="Bigger bodies are dead-lettered.")
    max_hops: int = Field(default=32, gt=0, description="Messages past this hop count are dead-lettered.")
    concurrency: int = Field(default=64, gt=0, description="Handlers running at once per agent process.")
    drain_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to finish in-flight work on SIGTERM."
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    llm: Literal["auto", "offline", "anthropic", "openai"] = Field(
        default="auto",
        description="auto: Anthropic when ANTHROPIC_API_KEY is set, else an OpenAI-compatible server "
        "when MESH_OPENAI_BASE_URL is set, else offline.",
    )
    anthropic_model: str = "claude-sonnet-4-5"
    # model providers, routing and limits: see docs/llm-and-tools.md
    llm_fallback: str = Field(
        default="",
        description="Providers tried in order after MESH_LLM fails, comma-separated "
        "(anthropic, openai, offline).",
    )
    openai_base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM, Ollama)."
    )
    openai_model: str = Field(default="llama3.1", description="Model name sent to the OpenAI-compatible API.")
    llm_timeout: float = Field(default=60.0, gt=0, description="Seconds one model call may take.")
    llm_retries: int = Field(default=2, ge=0, description="Retries per provider on 429, 5xx, 529, timeouts.")
    llm_rate: float = Field(default=50.0, gt=0, description="Model calls a second, per tenant and per agent.")
    llm_burst: float = Field(default=20.0, ge=1, description="Model calls that may start at once.")
    llm_concurrency: int = Field(default=8, gt=0, description="Model calls at once per tenant and per agent.")
    llm_breaker_failures: int = Field(
        default=5, gt=0, description="Failures in a row that open a provider's circuit breaker."
    )
    llm_breaker_reset: float = Field(
        default=30.0, gt=0, description="Seconds an open breaker waits before it lets a probe call through."
    )
    tenant: str = Field(default="default", description="Tenant this process works for (model limits, costs).")
    budget_conversation_tokens: int = Field(
        default=0, ge=0, description="Model tokens (input + output) one conversation may spend; 0: no limit."
    )
    budget_conversation_usd: float = Field(
        default=0.0, ge=0, description="Estimated model cost in USD one conversation may spend; 0: no limit."
    )
    budget_tenant_tokens: int = Field(
        default=0, ge=0, description="Model tokens the tenant may spend per UTC day; 0: no limit."
    )
    budget_tenant_usd: float = Field(
        default=0.0,
        ge=0,
        description="Estimated model cost in USD the tenant may spend per UTC day; 0: no limit.",
    )
    loop_repeats: int = Field(
        default=3,
        ge=0,
        description="Times the same message (type, sender, receiver, body) may come back in one chain of "
        "messages before it is dead-lettered as loop_detected; 0: no check.",
    )
    tool_timeout: float = Field(default=30.0, gt=0, description="Default seconds a tool may run.")
    approval_timeout: float = Field(
        default=3600.0, gt=0, description="Seconds an approval request waits for a decision, then expires."
    )
    policy_file: Path | None = Field(
        default=None,
        description="Policy rules (TOML, docs/llm-and-tools.md#policies) checked on every tool call, "
        "outgoing message and model reply of an agent; read and compiled at start, where a bad rule "
        "stops the agent with its file, line and reason. Unset: no rules.",
    )
    policy_report_only: bool = Field(
        default=False,
        description="Record what the policy rules would do (trace, audit) without enforcing any of them.",
    )
    types: str = Field(
        default="",
        description="Extra modules or .py files declaring message types, comma-separated; the CLI "
        "imports them to validate `mesh publish` and list them in `mesh schema`.",
    )
    dead_letter_stream: str = Field(default="MESH_DLQ", pattern=r"^[A-Za-z0-9_-]+$")
    # durability: see docs/handoffs.md and docs/operations.md
    storage: Literal["file", "memory"] = Field(
        default="file", description="Where JetStream keeps inboxes, events, dead letters and state."
    )
    replicas: int = Field(
        default=1, ge=1, le=5, description="Stream and bucket replicas (3 on a cluster survives a lost node)."
    )
    fsync: Literal["interval", "always"] = Field(
        default="interval",
        description="Embedded server only: 'always' fsyncs before every ack (slower, survives a machine "
        "crash); 'interval' fsyncs every 2 minutes (survives a process crash).",
    )
    event_retention: float = Field(default=7 * 86400.0, gt=0, description="Seconds events are kept.")
    dedupe_window: float = Field(
        default=300.0, gt=0, description="Seconds a Nats-Msg-Id is remembered for publish dedupe."
    )
    publish_retry_attempts: int = Field(
        default=20,
        ge=1,
        description="Attempts of a durable publish (to an inbox, events or timers) that the stream "
        "does not acknowledge: no answer in time, no stream leader, no quorum. Every attempt carries "
        "the same Nats-Msg-Id, so the stream keeps one copy.",
    )
    publish_retry_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a durable publish may spend on its attempts before it gives up with an "
        "error. Less than MESH_DEDUPE_WINDOW.",
    )
    ack_wait: float = Field(
        default=30.0, gt=0, description="Seconds without an ack or progress before redelivery."
    )
    max_deliver: int = Field(default=5, ge=2, description="Deliveries before a message is dead-lettered.")
    retry_backoff: float = Field(default=1.0, gt=0, description="First retry delay in seconds; doubles.")
    retry_backoff_max: float = Field(default=60.0, gt=0, description="Longest retry delay in seconds.")
    max_ack_pending: int = Field(
        default=1000, gt=0, description="Unacknowledged messages per agent, over all its replicas."
    )
    handler_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a handler may run before it is cancelled and retried."
    )
    max_depth: int = Field(default=8, gt=0, description="Nesting limit of delegations (fan-outs).")
    processed_ttl: float = Field(
        default=86400.0, gt=0, description="Seconds a processed message id is remembered."
    )
    journal_ttl: float = Field(
        default=86400.0,
        gt=0,
        description="Seconds the model replies and tool results of a handling are kept, so a "
        "redelivered message gets them again instead of calling the model again (MESH_JOURNAL).",
    )
    # limits: see docs/operations.md#limits
    stream_max_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Bytes each of MESH_INBOX, MESH_EVENTS, MESH_TIMERS and the dead-letter stream "
        "may hold (0: no limit). A full inbox or timer stream refuses new messages; a full event or "
        "dead-letter stream drops its oldest.",
    )
    stream_max_msgs_per_subject: int = Field(
        default=100_000,
        ge=0,
        description="Messages waiting on one subject of MESH_INBOX or MESH_TIMERS (one agent, one "
        "conversation) before the stream refuses more (0: no limit).",
    )
    dlq_retention: float = Field(default=14 * 86400.0, gt=0, description="Seconds dead letters are kept.")
    audit_retention: float = Field(
        default=365 * 86400.0, gt=0, description="Seconds audit records are kept (MESH_AUDIT, append-only)."
    )
    record: bool = Field(
        default=True,
        description="Record what each process sends and receives in MESH_RECORD, so a conversation can "
        "be listed, shown and replayed after it ended (mesh conversations, mesh show, mesh replay).",
    )
    record_retention: float = Field(
        default=7 * 86400.0, gt=0, description="Seconds the conversation record is kept (MESH_RECORD)."
    )
    sender_rate: float = Field(
        default=1000.0,
        ge=0,
        description="Messages a second one agent process takes from one sender (Mesh-Sender); more "
        "are dead-lettered as rate_limited. 0: no quota.",
    )
    sender_burst: int = Field(
        default=10_000, ge=1, description="Messages one sender may send at once, above the rate."
    )
    identities: Path | None = Field(
        default=None,
        description="The identities signed messages are verified against: a keyring's users.json "
        "(or its directory), as `mesh creds` writes it. Unset: the users.json of the keyring that "
        "MESH_NATS_CREDS was issued in.",
    )
    replay_window: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a signed message is accepted after (or before) its Mesh-Sent-At, and "
        "its id remembered to refuse a replay.",
    )
    replay_shared: bool = Field(
        default=True,
        description="Record the id of every signed direct message in MESH_SEEN, so every replica of "
        "an agent refuses its replay (one KV write per direct message). false: each process "
        "remembers its own, and a replay that reaches another replica within the window is handled.",
    )
    secret_headers: str = Field(
        default="",
        description="Header names, comma-separated, whose values are never stored in a dead letter, "
        "besides Authorization, cookies and names with token, secret, password or api-key.",
    )
    # shared memory (docs/memory.md): the agent side, then the memory service's side
    memory_agent: str = Field(default="memory", description="Name of the memory service agent.")
    memory_tenant: str = Field(
        default="default", description="Tenant whose memories this process's `ctx.memory` reads and writes."
    )
    memory_timeout: float = Field(
        default=2.0, gt=0, description="Seconds `ctx.memory` waits for the memory service."
    )
    memory_tenants: str = Field(
        default="default", description="Memory service: tenants it serves, comma-separated; '*' for any."
    )
    memory_scopes: str = Field(
        default="",
        description="Memory service: the tenant and namespaces of each caller identity, "
        "'<identity>=<tenant>[/<namespace>|<prefix>*]' comma-separated, '*' for any other identity; "
        "unlisted callers are in tenant 'default'. The request's tenant field is never used.",
    )
    memory_backend: Literal["auto", "edge", "qdrant", "qdrant-local"] = Field(
        default="auto",
        description="auto: a Qdrant server when MESH_QDRANT_URL is set, else the embedded engine "
        "(edge) under <data_dir>/memory; qdrant-local: qdrant-client's local mode under the data dir.",
    )
    qdrant_url: str | None = Field(default=None, description="Qdrant server URL for the memory service.")
    qdrant_api_key: str | None = Field(default=None, repr=False, description="Qdrant server API key.")
    # `mesh gateway` (mesh.gateway.auth reads them): files of name=secret lines
    gateway_tokens: Path | None = Field(
        default=None, description="`mesh gateway`: a file of name=token lines, the bearer tokens it accepts."
    )
    gateway_secrets: Path | None = Field(
        default=None, description="`mesh gateway`: a file of source=secret lines, the webhook HMAC secrets."
    )
    gateway_approvers: str = Field(
        default="",
        description="`mesh gateway`: token names (comma-separated) that may decide approvals in the web "
        "view; needs MESH_GATEWAY_DECIDER_CREDS.",
    )
    gateway_decider_creds: Path | None = Field(
        default=None,
        description="`mesh gateway`: operator credentials, used only to send the web view's "
        "approval decisions.",
    )
    trace_url: str = Field(
        default="",
        description="A trace UI's URL with {trace_id} in it (e.g. http://jaeger:16686/trace/{trace_id}), "
        "linked from the web view.",
    )
    qdrant_collection: str = Field(default="mesh_memory", pattern=r"^[A-Za-z0-9_-]+$")
    qdrant_shards: int = Field(default=1, ge=1, description="Qdrant server: shards of a new collection.")
    qdrant_replicas: int = Field(default=1, ge=1, description="Qdrant server: replicas of each shard.")
    qdrant_write_consistency: int = Field(
        default=1, ge=1, description="Qdrant server: replicas that must ack a write."
    )
    memory_embedder: Literal["hash", "minilm"] = Field(
        default="hash",
        description="hash: offline, deterministic, no download; minilm: all-MiniLM-L6-v2 from the "
        "optional `memory-minilm` extra.",
    )
    memory_dim: int = Field(default=384, ge=16, le=4096, description="Dimension of the hash embedder.")
    memory_max_text: int = Field(default=8192, gt=0, description="Longest memory text, in characters.")
    memory_dedupe: float = Field(
        default=0.92, gt=0, le=1.0, description="Cosine similarity at or above which a new memory merges."
    )
    memory_turn_budget: int = Field(
        default=1024, ge=64, description="Tokens of working memory kept per conversation before compressing."
    )
    memory_sweep: float = Field(default=60.0, gt=0, description="Seconds between sweeps of expired memories.")

    @field_validator("secret_headers")
    @classmethod
    def _header_names(cls, value: str) -> str:
        for name in (n.strip() for n in value.split(",") if n.strip()):
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a header name: give names such as X-Session-Key, comma-separated"
                )
            if name.lower().startswith(("mesh-", "nats-")):
                raise ValueError(
                    f"{name!r} is one of the mesh's own headers, which a dead letter needs; "
                    f"only other headers can be secret"
                )
        return value

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("not a TCP port: give 1-65535 for the metrics endpoint, or 0 for none")
        return value

    @field_validator("policy_file")
    @classmethod
    def _policy_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file: give the path of a TOML file of [[rule]] tables")
        return value

    @property
    def secret_header_names(self) -> frozenset[str]:
        """MESH_SECRET_HEADERS, lower-case."""
        return frozenset(n.strip().lower() for n in self.secret_headers.split(",") if n.strip())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.event_retention < self.dedupe_window:
            raise ValueError(
                f"MESH_EVENT_RETENTION ({self.event_retention:g}s) must be at least MESH_DEDUPE_WINDOW "
                f"({self.dedupe_window:g}s): JetStream cannot remember ids longer than it keeps messages"
            )
        if self.publish_retry_timeout >= self.dedupe_window:
            raise ValueError(
                f"MESH_PUBLISH_RETRY_TIMEOUT ({self.publish_retry_timeout:g}s) must be less than "
                f"MESH_DEDUPE_WINDOW ({self.dedupe_window:g}s): a retry after the window could store "
                f"a message twice"
            )
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("MESH_NATS_TLS_CERT and MESH_NATS_TLS_KEY go together: set both, or neither")
        return self

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read and validate settings; a `ConfigError` names each bad variable and the fix."""
        env = os.environ if environ is None else environ
        known = {PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ConfigError(
                "unknown mesh setting(s): "
                + ", ".join(hints)
                + ". Known settings: "
                + ", ".join(sorted(known))
            )
        values: dict[str, object] = {
            name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env
        }
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                if not err["loc"]:  # a rule across settings
                    problems.append(err["msg"].removeprefix("Value error, "))
                    continue
                field = str(err["loc"][0])
                shown = MASK if field in _SECRET_FIELDS else redact_url(repr(err.get("input")))
                problems.append(f"{PREFIX}{field.upper()}={shown}: {err['msg']}")
            raise ConfigError("invalid mesh settings: " + "; ".join(problems)) from None

    def environ(self) -> dict[str, str]:
        """The MESH_* variables that give a child process these settings: every one set here
        (from the environment or an override); the others are defaults there as well."""
        values = self.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        return {PREFIX + name.upper(): str(value) for name, value in values.items()}

    @property
    def spans_path(self) -> Path:
        return self.trace_file or self.data_dir / "traces.jsonl"
