"""The support-desk demo: triage -> research -> writer, each its own process."""

AGENTS = (
    "mesh.agents.support.triage:agent",
    "mesh.agents.support.research:agent",
    "mesh.agents.support.writer:agent",
)
