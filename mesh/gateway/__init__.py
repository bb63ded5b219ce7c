"""The HTTP ingress (`mesh gateway`): webhooks and programs start and follow mesh work over
HTTP, as a role of their own on NATS (docs/gateway.md)."""
