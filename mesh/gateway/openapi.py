"""`GET /openapi.json`: the gateway's API, with the schema of every message type declared
in the gateway's process (as `mesh schema` prints them) as its request bodies."""

from __future__ import annotations

from typing import Any

import msgspec

from mesh.wire.messages import registry

_REF = "#/components/schemas/{name}"
_ERROR = {"description": "an error: {error, detail}", "content": {"application/json": {}}}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"webhook": []}]


def openapi() -> dict[str, Any]:
    types = [t for t in registry if registry.get(t.name).version == t.version]  # the latest of each
    refs, components = msgspec.json.schema_components([t.cls for t in types], ref_template=_REF)
    paths: dict[str, Any] = {}
    for mtype, ref in zip(types, refs, strict=True):
        paths[f"/v1/events/{mtype.name}"] = {
            "post": {
                "summary": f"Publish a {mtype} event",
                "operationId": f"publish_{mtype.name.replace('.', '_')}",
                "parameters": [_IDEMPOTENCY],
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
                "responses": {"202": _ACCEPTED, "401": _ERROR, "413": _ERROR, "422": _ERROR},
            }
        }
    agent = {"name": "agent", "in": "path", "required": True, "schema": {"type": "string"}}
    mtype_param = {"name": "type", "in": "query", "required": True, "schema": {"type": "string"}}
    any_body = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/v1/agents/{agent}"] = {
        "post": {
            "summary": "Send a message of ?type= to an agent's inbox",
            "parameters": [agent, mtype_param, _IDEMPOTENCY],
            "requestBody": any_body,
            "responses": {"202": _ACCEPTED, "401": _ERROR, "404": _ERROR, "422": _ERROR},
        }
    }
    timeout = {"name": "timeout", "in": "query", "schema": {"type": "number", "maximum": 60}}
    paths["/v1/agents/{agent}/request"] = {
        "post": {
            "summary": "Ask an agent and wait for its answer",
            "parameters": [agent, mtype_param, timeout],
            "requestBody": any_body,
            "responses": {"200": {"description": "the answer"}, "502": _ERROR, "504": _ERROR},
        }
    }
    conv = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths["/v1/conversations/{id}"] = {
        "get": {
            "summary": "A conversation's status (done, waiting, failed, running) and result",
            "parameters": [conv],
            "responses": {"200": {"description": "the status"}, "404": _ERROR},
        }
    }
    paths["/v1/conversations/{id}/events"] = {
        "get": {
            "summary": "A conversation's messages, recorded then live, as server-sent events",
            "parameters": [conv],
            "responses": {"200": {"description": "text/event-stream"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mesh gateway", "version": "1"},
        "paths": paths,
        "security": _SECURITY,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "webhook": {"type": "apiKey", "in": "header", "name": "X-Hub-Signature-256"},
            },
        },
    }


_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 128}}
_ACCEPTED = {"description": "accepted: {id, conversation, type, subject}"}
