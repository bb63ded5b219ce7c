"""The support-desk demo: triage supervises each ticket; research (two replicas, one
request per knowledge source in parallel) and policy answer it; the writer drafts the reply.
Each is its own process."""

AGENTS = (
    "mesh.agents.support.triage:agent",
    "mesh.agents.support.research:agent",
    "mesh.agents.support.policy:agent",
    "mesh.agents.support.writer:agent",
)
