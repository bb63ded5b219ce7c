"""The mesh's message types, installed as `mesh.schemas`.

Each module groups the types of one domain. Importing `mesh.schemas` registers all of
them, which is what `mesh schema`, `mesh publish` and `mesh tap` rely on.
"""

from mesh.schemas import memory, support

__all__ = ["memory", "support"]
