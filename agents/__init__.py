"""Specialist agent processes, installed as `mesh.agents`.

Start one with `mesh run mesh.agents.support.triage:agent`.
"""
