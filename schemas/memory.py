"""Shared-memory messages. They belong to the runtime (the memory service and its client
use them), so they live in `mesh.memory.messages`; this module names them among the
project's schemas so that `mesh schema`, `mesh publish` and `mesh tap` know them."""

from mesh.memory.messages import (
    AddTurn,
    Forget,
    Forgotten,
    GetHistory,
    History,
    MemoryFailed,
    MemoryHit,
    Provenance,
    Recall,
    Recalled,
    Remember,
    Remembered,
    Turn,
)

__all__ = [
    "AddTurn",
    "Forget",
    "Forgotten",
    "GetHistory",
    "History",
    "MemoryFailed",
    "MemoryHit",
    "Provenance",
    "Recall",
    "Recalled",
    "Remember",
    "Remembered",
    "Turn",
]
