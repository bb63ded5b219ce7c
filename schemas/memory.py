"""Shared-memory messages. They belong to the runtime (the memory service and its client
use them), so they live in `mesh.memory.messages`; this module names them among the
project's schemas so that `mesh schema`, `mesh publish` and `mesh tap` know them."""

from mesh.memory.messages import (
    AddTurn,
    Edge,
    Entity,
    EntityStored,
    Forget,
    Forgotten,
    GetHistory,
    GetNeighbourhood,
    History,
    MemoryFailed,
    MemoryHit,
    Neighbourhood,
    Provenance,
    Recall,
    Recalled,
    Relation,
    Remember,
    Remembered,
    Turn,
    UpsertEntity,
)

__all__ = [
    "AddTurn",
    "Edge",
    "Entity",
    "EntityStored",
    "Forget",
    "Forgotten",
    "GetHistory",
    "GetNeighbourhood",
    "History",
    "MemoryFailed",
    "MemoryHit",
    "Neighbourhood",
    "Provenance",
    "Recall",
    "Recalled",
    "Relation",
    "Remember",
    "Remembered",
    "Turn",
    "UpsertEntity",
]
