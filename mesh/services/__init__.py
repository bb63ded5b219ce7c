"""Agents shipped with the mesh (the memory service)."""
