"""`mesh demo`: the support desk, live.

Starts (or reuses) the embedded nats-server, starts triage, research (two replicas),
policy and writer as OS processes, taps the mesh, publishes tickets as the helpdesk would,
and prints each conversation as a causal tree with its trace id, then the trace's spans.

Each ticket shows the three handoffs: triage supervises the case (hierarchical: it
delegates and synthesizes without waiting in memory), research and policy work on it in
parallel, research fans out again to one request per knowledge source across its
replicas, and the writer drafts the reply (sequential).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import msgspec

from mesh.agent.launch import spawn_agent, stop_process
from mesh.cli.server import create_streams
from mesh.observability.conversation import render_tree
from mesh.observability.tap import TapLine, format_line
from mesh.observability.tracing import configure_tracing, exporter_kind, read_spans, render_spans
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.transport import cluster
from mesh.transport import server as srv
from mesh.transport.identities import as_role, embedded_server, with_role
from mesh.wire.errors import MeshError
from mesh.wire.secrets import redact_url
from mesh.wire.settings import Settings

TICKETS = [
    {
        "ticket_id": "T-1001",
        "customer": "Ada",
        "subject": "Charged twice for my subscription",
        "body": "My card 4111 1111 1111 1111 shows two charges for the March invoice. Can I get a refund?",
    },
    {
        "ticket_id": "T-1002",
        "customer": "Linus",
        "subject": "Export fails with error 500",
        "body": "Exporting my reports crashes with error 500 since yesterday. This is urgent.",
    },
    {
        "ticket_id": "T-1003",
        "customer": "Grace",
        "subject": "Locked out of my account",
        "body": "I typed the wrong password a few times and my account is locked. How do I log in?",
    },
]

AGENT_SPECS = {
    "memory": "mesh.services.memory:agent",  # shared memory: research remembers and recalls tickets
    "triage": "mesh.agents.support.triage:agent",
    "research": "mesh.agents.support.research:agent",
    "policy": "mesh.agents.support.policy:agent",
    "writer": "mesh.agents.support.writer:agent",
}
REPLICAS = {"research": 2}
# every agent runs under the support desk's policy rules: card numbers are redacted on the way out
RULES = "rules.toml"  # in the mesh.agents.support package
REDACTED = "[redacted]"
BUDGET_TOKENS = 20_000  # each conversation's model budget (MESH_BUDGET_CONVERSATION_TOKENS)


Ask = Callable[[str], Awaitable[bool]]


async def run_demo(
    settings: Settings,
    *,
    tickets: int = 2,
    out: Callable[[str], None] = print,
    ask: Ask | None = None,
) -> int:
    """Run the support desk. Approvals are granted at once unless `ask` (the interactive
    demo's prompt) says otherwise."""
    from mesh.schemas.support import TicketOpened

    shutdown_tracing = configure_tracing(settings, "helpdesk")
    owned: srv.EmbeddedServer | None = None
    info = srv.running(settings) if not settings.nats_url else None
    members = cluster.running(settings) if not settings.nats_url and info is None else None
    if settings.nats_url:
        url = settings.nats_url
        out(f"using the NATS server at {redact_url(url)}")
    elif info is not None:
        url = info.url
        out(f"using the running mesh server {redact_url(url)}")
    elif members is not None:
        url = members[0]
        out(f"using the running mesh cluster {redact_url(url)}")
    else:
        owned = embedded_server(settings)  # secure by default, as `mesh up`
        info = owned.start()
        srv.write_state(settings, info)
        url = info.url
        out(f"started nats-server {redact_url(url)} (JetStream store under {srv.server_dir(settings)})")
        # agents may not create streams and buckets: the operator makes them first, as `mesh up`
        await create_streams(as_role(settings, owned, "operator"), url, buckets=True)
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, spec in AGENT_SPECS.items():
            for i in range(REPLICAS.get(name, 1)):
                log = logs / f"{name}{i or ''}.log"
                rules = {
                    "MESH_POLICY_FILE": str(files("mesh.agents.support") / RULES),
                    "MESH_BUDGET_CONVERSATION_TOKENS": str(BUDGET_TOKENS),
                }
                if settings.metrics_port:  # one scrape endpoint each: the next ports up
                    rules["MESH_METRICS_PORT"] = str(settings.metrics_port + len(procs))
                procs.append(
                    spawn_agent(
                        spec, url=url, data_dir=settings.data_dir, log=log, settings=settings, env=rules
                    )
                )
                out(f"started agent {name:<9} pid {procs[-1].pid}  (log: {log})")
        out("tip: in another shell, `mesh tap` shows the same traffic; `mesh agents` lists the agents")
        # the helpdesk starts tickets and, in the demo, approves refunds: the operator role
        client = await MeshClient.connect(with_role(settings, "operator"), "helpdesk", url=url)
        try:
            wanted = {n: REPLICAS.get(n, 1) for n in AGENT_SPECS}
            await wait_for_agents(client.transport, wanted, timeout=30)
            out("all agents joined the mesh\n")
            trace_ids = []
            for raw in (TICKETS * (1 + tickets // len(TICKETS)))[:tickets]:
                ticket = TicketOpened(**raw)
                trace_ids.append(await _one_conversation(client, settings, ticket, out, ask))
        finally:
            await client.close()
    finally:
        for p in procs:
            p.terminate()  # all at once: they drain in parallel
        for p in procs:
            code = stop_process(p, terminate=False)
            if code != 0:
                out(f"agent process {p.pid} exited with {code}; see its log under {logs}")
        if owned is not None:
            owned.stop()
            srv.clear_state(settings)
        shutdown_tracing()
    _print_spans(settings, trace_ids, out)
    return 0


async def _one_conversation(
    client: MeshClient, settings: Settings, ticket: object, out: Callable[[str], None], ask: Ask | None
) -> str:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from mesh.observability.tap import observe
    from mesh.observability.tracing import current_trace_id
    from mesh.patterns.approval import ApprovalRequest
    from mesh.schemas.support import ReplyDrafted
    from mesh.wire.codec import default_codec
    from mesh.wire.envelope import new_id
    from mesh.wire.subjects import conversation_pattern

    conversation = new_id()
    lines: list[TapLine] = []
    finished = asyncio.Event()
    replies: list[ReplyDrafted] = []
    chunks: list[str] = []
    decisions: list[asyncio.Task[None]] = []
    redacted: list[str] = []  # messages a policy rule redacted something in

    async def on_message(msg: Any) -> None:
        line = observe(msg)
        if line.type in ("mesh.join_timer", "mesh.approval_timer"):
            return  # deadline timers: bookkeeping, not conversation
        if line.type == "llm.chunk":  # the streamed answer: shown growing on one line
            chunks.append(str(msgspec.json.decode(msg.data).get("text", "")))
            if len(chunks) % 12 == 1:  # every twelfth chunk, to keep the screen readable
                out(f"  … writer streams ({len(chunks)} chunks): …{''.join(chunks)[-80:]}")
            return
        lines.append(line)
        if REDACTED.encode() in msg.data:
            redacted.append(line.type)
        out("  " + format_line(line, subject=False))
        if line.type == "approval.request":
            request = default_codec.decode(msg.data, ApprovalRequest)
            decision = _decide(client, settings, request, dict(msg.headers or {}), out, ask)
            decisions.append(asyncio.create_task(decision))
        elif line.type == "support.reply_drafted":
            replies.append(default_codec.decode(msg.data, ReplyDrafted))
            finished.set()
        elif line.dead_letter:
            finished.set()

    sub = await client.transport.subscribe(conversation_pattern(conversation), on_message)
    await client.transport.flush()
    out(f"helpdesk opens ticket {getattr(ticket, 'ticket_id', '?')} (conversation {conversation})")
    with trace.get_tracer("mesh").start_as_current_span("helpdesk open ticket", kind=SpanKind.PRODUCER):
        await client.publish(ticket, conversation=conversation)  # type: ignore[arg-type]
        trace_id = current_trace_id()
    try:
        await asyncio.wait_for(finished.wait(), 30)
    except TimeoutError:
        raise MeshError(
            f"conversation {conversation} did not finish within 30s; see the agent logs"
        ) from None
    finally:
        await sub.unsubscribe()
    for task in decisions:
        await task
    if chunks:
        out(f"  (the answer was streamed in {len(chunks)} chunks, then sent whole as llm.final)")
    if redacted:
        out(
            f"  policy: rule no-card-numbers-out redacted a card number in {len(redacted)} messages "
            f"({', '.join(sorted(set(redacted)))})"
        )
    out(f"\nconversation {conversation} as a causal tree (trace {trace_id}):")
    out(render_tree(lines))
    await _show_budget(client, settings, conversation, out)
    for reply in replies:
        out(
            f"\nreply drafted ({reply.category}, {reply.priority}, model {reply.model}, "
            f"sources {reply.sources}):"
        )
        for action in reply.actions:
            out(f"  tool: {action}")
        out("  | " + reply.reply.replace("\n", "\n  | ") + "\n")
    return trace_id


async def _show_budget(
    client: MeshClient, settings: Settings, conversation: str, out: Callable[[str], None]
) -> None:
    """What the conversation spent of its model budget, as the agents counted it (MESH_STATE)."""
    from mesh.llm.budget import Spent, conversation_key
    from mesh.transport.streams import bucket_specs

    state = await client.transport.state(bucket_specs(settings)[1], settings)
    got = await state.get(conversation_key(conversation))
    spent = msgspec.json.decode(got[0], type=Spent) if got is not None else Spent()
    out(
        f"budget: this conversation's model calls used {spent.tokens:,} of its {BUDGET_TOKENS:,} tokens "
        f"(MESH_BUDGET_CONVERSATION_TOKENS; past it, the next call ends the conversation as budget_exceeded)"
    )


async def _decide(
    client: MeshClient,
    settings: Settings,
    request: Any,
    headers: dict[str, str],
    out: Callable[[str], None],
    ask: Ask | None,
) -> None:
    """Answer a tool's approval request: at once in the plain demo, by asking with --interactive.
    The decision continues the request's trace, so the resumed work stays in the conversation's."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from mesh.cli.llm import decide

    question = f"{request.agent} wants to run {request.tool}({request.arguments})"
    approved = True if ask is None else await ask(question)
    who = "helpdesk (auto-approved in the demo)" if ask is None else "you"
    out(f"  approval {request.approval}: {question}: {'approved' if approved else 'denied'} by {who}")
    parent = TraceContextTextMapPropagator().extract(headers)
    with trace.get_tracer("mesh").start_as_current_span("helpdesk decide approval", context=parent):
        reason = "" if approved else "denied"
        await decide(
            client,
            settings,
            request.approval,
            approved=approved,
            by=who,
            reason=reason,
            causation=headers.get("Mesh-Id", ""),
        )


def _print_spans(settings: Settings, trace_ids: list[str], out: Callable[[str], None]) -> None:
    if exporter_kind(settings) != "file":
        out(f"spans were sent to the {exporter_kind(settings)} exporter")
        return
    for trace_id in trace_ids:
        spans = read_spans(settings.spans_path, trace_id)
        services = sorted({str(s["service"]) for s in spans})
        out(f"trace {trace_id}: {len(spans)} spans from {len(services)} processes ({', '.join(services)})")
        if not spans:
            continue
        out(render_spans(spans))
    out(f"(spans are in {settings.spans_path}; `mesh trace <id>` prints one again)")
