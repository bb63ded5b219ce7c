"""mesh: an event-driven multi-agent mesh on NATS.

The public face is small; everything else is importable but internal.
"""

from mesh.agent import Agent
from mesh.client import MeshClient, Sent
from mesh.codec import JSON, MSGPACK
from mesh.context import Context
from mesh.errors import ConfigError, DeliveryError, MeshError, Reject, RequestError
from mesh.join import Gathered, Join, Part, all_of, first, judge, majority, merge, quorum
from mesh.llm import LLM
from mesh.messages import Message, message
from mesh.middleware import Call, Middleware
from mesh.serving import serve
from mesh.settings import Settings

__all__ = [
    "JSON",
    "LLM",
    "MSGPACK",
    "Agent",
    "Call",
    "ConfigError",
    "Context",
    "DeliveryError",
    "Gathered",
    "Join",
    "MeshClient",
    "MeshError",
    "Message",
    "Middleware",
    "Part",
    "Reject",
    "RequestError",
    "Sent",
    "Settings",
    "all_of",
    "first",
    "judge",
    "majority",
    "merge",
    "message",
    "quorum",
    "serve",
]
