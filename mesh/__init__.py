"""mesh: an event-driven multi-agent mesh on NATS.

The public face is small; everything else is importable but internal.
"""

from mesh import join
from mesh.agent.context import Context
from mesh.agent.declaration import Agent
from mesh.agent.serving import serve
from mesh.llm import LLM
from mesh.middleware.base import Call, Middleware
from mesh.patterns.escalation import HUMAN
from mesh.runtime.client import MeshClient, Sent
from mesh.wire.codec import JSON, MSGPACK
from mesh.wire.errors import ConfigError, DeliveryError, MeshError, Reject, RequestError
from mesh.wire.messages import Message, message
from mesh.wire.settings import Settings

__all__ = [
    "HUMAN",
    "JSON",
    "LLM",
    "MSGPACK",
    "Agent",
    "Call",
    "ConfigError",
    "Context",
    "DeliveryError",
    "MeshClient",
    "MeshError",
    "Message",
    "Middleware",
    "Reject",
    "RequestError",
    "Sent",
    "Settings",
    "join",
    "message",
    "serve",
]
