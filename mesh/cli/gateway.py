"""`mesh gateway`: the HTTP ingress (docs/gateway.md), on uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from mesh.transport.auth import Role
from mesh.wire.settings import Settings


def register(cli: click.Group, settings_of: Callable[[Role], Settings]) -> None:
    @cli.command("gateway")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
    @click.option(
        "--tokens",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="File of name=token lines: bearer tokens (or MESH_GATEWAY_TOKENS).",
    )
    @click.option(
        "--secrets",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="File of source=secret lines: webhook HMAC secrets (or MESH_GATEWAY_SECRETS).",
    )
    @click.option("--types", "types_", default="", help="Modules/.py files declaring your message types.")
    @click.option(
        "--public-cards",
        is_flag=True,
        help="Serve A2A Agent Cards (/a2a/<agent>/.well-known/agent-card.json) without a token.",
    )
    @click.option(
        "--approvers",
        default=None,
        help="Token names that may approve or deny tool calls in the web view, comma-separated "
        "(or MESH_GATEWAY_APPROVERS); needs --decider-creds.",
    )
    @click.option(
        "--decider-creds",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Operator credentials, used only for the web view's decisions (or MESH_GATEWAY_DECIDER_CREDS).",
    )
    @click.option(
        "--trace-url",
        default=None,
        help="A trace UI's URL with {trace_id}, linked from the web view (or MESH_TRACE_URL).",
    )
    def gateway(
        host: str,
        port: int,
        tokens: Path | None,
        secrets: Path | None,
        types_: str,
        approvers: str | None,
        decider_creds: Path | None,
        trace_url: str | None,
        public_cards: bool,
    ) -> None:
        """Serve the mesh over HTTP: webhooks and programs publish events, send to agents,
        ask them, and follow conversations; people watch them in the web view at /ui/. Every
        caller authenticates (a bearer token, an HMAC-signed body, or a session from a token);
        the gateway acts on the mesh as the publisher role (decisions: --decider-creds)."""
        import uvicorn

        from mesh.agent.loader import import_types
        from mesh.gateway.app import Gateway
        from mesh.gateway.auth import GatewayAuth
        from mesh.gateway.web import WebConfig
        from mesh.observability.metrics import configure_metrics
        from mesh.observability.tracing import configure_tracing

        settings = settings_of("publisher")
        import_types(",".join(filter(None, [settings.types, types_])))
        auth = GatewayAuth.load(tokens, secrets)
        web = WebConfig.load(
            settings, auth, approvers=approvers, decider_creds=decider_creds, trace_url=trace_url
        )
        # its requests, and the mesh client's, on MESH_METRICS_PORT (scraped) or by OTLP
        shutdown_metrics = configure_metrics(settings, "mesh-gateway", scrape=True)
        gw = Gateway(settings, auth, public_cards=public_cards, web=web)
        click.echo(f"mesh gateway on http://{host}:{port}, web view at /ui/ (docs/gateway.md)", err=True)
        shutdown_tracing = configure_tracing(settings, "mesh-gateway")
        try:
            uvicorn.run(gw.app, host=host, port=port, log_level=settings.log_level, lifespan="on")
        finally:
            shutdown_tracing()
            shutdown_metrics()
