"""Shared semantic memory on Qdrant, reached through the mesh (docs/memory.md).

Agents use `ctx.memory` (`mesh.memory.client.Memory`); the memory service
(`mesh run mesh.services.memory:agent`) owns the Qdrant collection.
"""

from mesh.memory.backend import CollectionSpec, MemoryBackend, Where
from mesh.memory.client import Memory
from mesh.memory.embedding import Embedder, HashEmbedder, KeywordEncoder, make_embedder
from mesh.memory.store import MemoryStore, Origin, open_backend

__all__ = [
    "CollectionSpec",
    "Embedder",
    "HashEmbedder",
    "KeywordEncoder",
    "Memory",
    "MemoryBackend",
    "MemoryStore",
    "Origin",
    "Where",
    "make_embedder",
    "open_backend",
]
