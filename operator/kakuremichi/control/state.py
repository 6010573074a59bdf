"""What the control plane knows right now, shared by the reconcilers and the control channel.

It is rebuilt from the cluster on every start (allocations from status, keys from Secrets), so
it never holds anything that is not also in the resources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

from kakuremichi.addressing import SubnetAllocator
from kakuremichi.edge_config import AgentNode
from kakuremichi.store import Sealer


@dataclass(frozen=True)
class EdgeIdentity:
    role: Literal["agent", "gateway"]
    id: UUID


@dataclass
class ControlState:
    sealer: Sealer
    subnets: SubnetAllocator
    agents: dict[UUID, AgentNode] = field(default_factory=dict)
    credentials: dict[str, EdgeIdentity] = field(default_factory=dict)
    """API-key digest → the edge it authenticates."""

    def add_agent(self, agent: AgentNode, api_key: str) -> str:
        """Record an agent and its key; returns the key's digest."""
        digest = self.sealer.digest_api_key(api_key)
        self.agents[agent.id] = agent
        for stale in [d for d, who in self.credentials.items() if who.id == agent.id]:
            del self.credentials[stale]
        self.credentials[digest] = EdgeIdentity("agent", agent.id)
        return digest

    def remove_agent(self, agent_id: UUID) -> None:
        self.agents.pop(agent_id, None)
        for stale in [d for d, who in self.credentials.items() if who.id == agent_id]:
            del self.credentials[stale]
        self.subnets.release(agent_id)

    def authenticate(self, api_key: str) -> EdgeIdentity | None:
        return self.credentials.get(self.sealer.digest_api_key(api_key))
