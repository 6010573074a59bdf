"""Whether a Tunnel serves, and if not why: a pure function of what the control plane knows.

A Tunnel's readiness depends on other resources (its Agent, the other claims on its domain, its
certificate), so it is computed from the whole picture every time that picture changes, rather
than from the Tunnel's own events alone. That is what lets a Tunnel recover by itself when its
Agent comes back or the holder of its domain goes away.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from kakuremichi.conditions import ConditionStatus
from kakuremichi.edge_config import AgentNode, Claim, Route, domain_holders
from kakuremichi.resources import AppProtocol


@dataclass(frozen=True)
class TunnelFacts:
    """What a Tunnel resource says, as the reconciler last saw it."""

    id: UUID
    namespace: str
    name: str
    domain: str
    agent: str
    target: str
    enabled: bool
    created: datetime
    generation: int
    certificate: str
    """Name of the Certificate resource that serves it (same namespace)."""
    description: str | None = None
    app_protocol: AppProtocol = "HTTP1"

    @property
    def claim(self) -> Claim:
        return Claim(self.created, self.namespace, self.name)


@dataclass(frozen=True)
class CertificateVerdict:
    ready: bool
    reason: str
    message: str


@dataclass(frozen=True)
class TunnelVerdict:
    status: ConditionStatus
    reason: str
    message: str
    url: str


def agents_by_name(agents: Mapping[UUID, AgentNode]) -> dict[tuple[str, str], AgentNode]:
    return {(agent.namespace, agent.name): agent for agent in agents.values()}


def verdicts(
    tunnels: Mapping[UUID, TunnelFacts],
    agents: Mapping[UUID, AgentNode],
    certificates: Mapping[tuple[str, str], CertificateVerdict],
) -> dict[UUID, TunnelVerdict]:
    by_name = agents_by_name(agents)
    holders = domain_holders((t.domain, t.claim) for t in tunnels.values())
    holder_names = {(t.domain, t.claim): f"{t.namespace}/{t.name}" for t in tunnels.values()}
    result: dict[UUID, TunnelVerdict] = {}
    for tunnel in tunnels.values():
        url = f"https://{tunnel.domain}"
        holder = holders[tunnel.domain]
        certificate = certificates.get((tunnel.namespace, tunnel.certificate))
        if holder != tunnel.claim:
            verdict = TunnelVerdict(
                "False",
                "DomainConflict",
                f"{tunnel.domain} is already claimed by Tunnel "
                f"{holder_names[(tunnel.domain, holder)]}",
                url,
            )
        elif (tunnel.namespace, tunnel.agent) not in by_name:
            verdict = TunnelVerdict(
                "False",
                "AgentNotReady",
                f"Agent {tunnel.namespace}/{tunnel.agent} does not exist or is not provisioned",
                url,
            )
        elif certificate is None or not certificate.ready:
            why = certificate.message if certificate else "not yet reconciled"
            reason = certificate.reason if certificate else "CertificatePending"
            verdict = TunnelVerdict(
                "False", reason, f"Certificate {tunnel.certificate}: {why}", url
            )
        elif not tunnel.enabled:
            verdict = TunnelVerdict("False", "Disabled", "spec.enabled is false", url)
        else:
            verdict = TunnelVerdict("True", "Serving", f"{url} routes to {tunnel.target}", url)
        result[tunnel.id] = verdict
    return result


def routes(
    tunnels: Mapping[UUID, TunnelFacts], agents: Mapping[UUID, AgentNode]
) -> tuple[Route, ...]:
    """Routes for the edge configs: every tunnel whose Agent is provisioned (the Topology then
    keeps only the claim that holds each domain)."""
    by_name = agents_by_name(agents)
    return tuple(
        Route(
            t.domain,
            by_name[(t.namespace, t.agent)].id,
            t.target,
            t.enabled,
            t.claim,
            h2c=t.app_protocol == "H2C",
        )
        for t in tunnels.values()
        if (t.namespace, t.agent) in by_name
    )
