"""What each edge should run, computed from the control plane's view of the resources.

Pure functions: the control plane's snapshot (:mod:`kakuremichi.control.snapshot`) holds a
:class:`Topology` and renders each connected edge's ``config`` from it. Which Tunnel holds a
domain is not decided here: the routes come decided (:mod:`kakuremichi.control.ownership`), one per
held domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal
from uuid import UUID

from pydantic import ValidationError

from kakuremichi.api.protocol import (
    AcmeChallenge,
    AgentBackend,
    AgentConfig,
    AgentPeer,
    AgentSelf,
    AgentTunnel,
    CertificateBundle,
    GatewayConfig,
    GatewayPeer,
    GatewaySelf,
    GatewayTunnel,
    RequestRule,
    WeightedBackend,
)
from kakuremichi.api.resources import ClientLimits, Hsts, ProxyProtocol, TunnelProtocol
from kakuremichi.control import addressing


@dataclass(frozen=True)
class AgentNode:
    """An Agent that has its addresses and keys."""

    id: UUID
    namespace: str
    name: str
    subnet_number: int
    """:mod:`addressing`'s number: ``10.N.M.0/24`` is ``M * 256 + N``."""
    public_key: str

    @cached_property
    def virtual_ip(self) -> str:
        return addressing.virtual_ip_text(self.subnet_number)

    @cached_property
    def subnet(self) -> str:
        return addressing.subnet_text(self.subnet_number)


@dataclass(frozen=True)
class GatewayNode:
    """One gateway instance (a DaemonSet node or an external host) that has an address."""

    id: UUID
    name: str
    """Instance name: the node's for InCluster pools, the Gateway's for External ones."""
    index: int
    public_ip: str
    public_key: str
    pool: str = ""
    """Name of the Gateway resource the instance belongs to."""
    wireguard_port: int = 51820
    http_port: int = 80
    https_port: int = 443
    trusted_proxies: tuple[str, ...] = ()
    client_limits: ClientLimits | None = None
    """None: the defaults."""
    accept_proxy_protocol: bool = False
    tunnel_ports: tuple[tuple[int, int], ...] = ()
    """The pool's ``tunnelPorts``: (first, last) ranges a TCP or UDP Tunnel's port must be in."""


@dataclass(frozen=True)
class Route:
    """A held domain and where it goes."""

    domain: str
    tunnel_id: UUID
    """The Tunnel that holds the domain."""
    agent_id: UUID | None
    """Its Agent; None while that Agent is not provisioned: the gateways answer 503 (the
    domain is still the holder's, never a younger claim's)."""
    target: str
    enabled: bool
    h2c: bool = False
    """The target speaks HTTP/2 without TLS (the Tunnel's appProtocol H2C)."""
    hsts: Hsts | None = None
    protocol: TunnelProtocol = "HTTP"
    port: int | None = None
    """The public port (TCP, UDP), which the Tunnel holds."""
    proxy_protocol: ProxyProtocol = "None"
    rules: tuple[RequestRule, ...] | None = None
    """A route's host: per-request routing to ``backends`` (None: a Tunnel's domain)."""
    backends: tuple[str, ...] = ()
    shares: tuple[tuple[str | None, int], ...] = ()
    """Several weighted backends of a passed-through route (see ``TunnelFacts.shares``)."""


@dataclass(frozen=True)
class Topology:
    agents: Mapping[UUID, AgentNode] = field(default_factory=dict)
    gateways: Mapping[UUID, GatewayNode] = field(default_factory=dict)
    gateway_boots: Mapping[UUID, str] = field(default_factory=dict)
    """Gateway instance → its process's boot id (agents restart their session on a new one)."""
    routes: tuple[Route, ...] = ()
    """One per held domain, sorted by domain."""
    certificates: Mapping[str, CertificateBundle] = field(default_factory=dict)
    """Domain → the certificate its holder serves."""
    challenges: tuple[AcmeChallenge, ...] = ()
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Route backend (``namespace/service:port``) → its ready endpoints (``ip:port``)."""

    def served_routes(self) -> list[Route]:
        """Routes that reach an agent, sorted by domain."""
        return [r for r in self.routes if r.agent_id is not None]

    def served_routes_of(self, agent_id: UUID) -> list[Route]:
        """The served routes through one agent, sorted by domain."""
        return list(self._served_by_agent.get(agent_id, ()))

    @cached_property
    def _served_by_agent(self) -> dict[UUID, tuple[Route, ...]]:
        by_agent: dict[UUID, list[Route]] = {}
        for route in self.routes:
            if route.agent_id is not None:
                by_agent.setdefault(route.agent_id, []).append(route)
        return {agent_id: tuple(routes) for agent_id, routes in by_agent.items()}

    def backends_of(self, agent_id: UUID) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The route backends one agent serves, with their endpoints, by name."""
        names = sorted({b for r in self._served_by_agent.get(agent_id, ()) for b in r.backends})
        return tuple((name, self.endpoints.get(name, ())) for name in names)

    # Computed once per topology and shared by every config rendered from it: a change fans out
    # to every connected edge, so per-edge work must stay small (bench/README.md).

    @cached_property
    def served_certificates(self) -> tuple[CertificateBundle, ...]:
        """The certificates of held domains, by domain."""
        held = {route.domain for route in self.routes if route.protocol == "HTTP"}
        return tuple(b for d, b in sorted(self.certificates.items()) if d in held)

    @cached_property
    def gateways_by_index(self) -> tuple[GatewayNode, ...]:
        return tuple(sorted(self.gateways.values(), key=lambda g: g.index))

    @cached_property
    def agents_by_subnet(self) -> tuple[AgentNode, ...]:
        """In allocation order: the document's 10.N.0.0/24 first."""
        return tuple(sorted(self.agents.values(), key=lambda a: a.subnet_number))

    @cached_property
    def _gateway_peers(self) -> dict[UUID, GatewayPeer]:
        """Each gateway as agents see it, validated once (its public IP's check is the costly
        part); only ``address`` differs per agent. (An AgentPeer has no such check: building
        it anew is as cheap as copying.)"""
        return {
            gateway.id: GatewayPeer(
                id=gateway.id,
                public_ip=gateway.public_ip,
                wireguard_public_key=gateway.public_key,
                wireguard_port=gateway.wireguard_port,
                address="",
                boot=self.gateway_boots.get(gateway.id),
            )
            for gateway in self.gateways_by_index
        }

    @cached_property
    def boots_by_index(self) -> tuple[str | None, ...]:
        return tuple(self.gateway_boots.get(g.id) for g in self.gateways_by_index)

    @cached_property
    def _gateway_tunnels(self) -> tuple[GatewayTunnel, ...]:
        return tuple(t for t in map(self._gateway_tunnel, self.routes) if t is not None)

    def _gateway_tunnel(self, route: Route) -> GatewayTunnel | None:
        """The route as gateways read it; None if it does not pass the wire's checks (a route
        from a tenant's Ingress that the checks before missed: it is left out, and every other
        route still reaches the gateways). A route's rules are also read back as a gateway reads
        them off the wire: one that would not come through whole would make a gateway refuse the
        whole config, everyone's routes with it."""
        try:
            made = GatewayTunnel(
                domain=route.domain,
                agent_virtual_ip=(
                    self.agents[route.agent_id].virtual_ip if route.agent_id is not None else None
                ),
                target=route.target,
                enabled=route.enabled,
                app_protocol="H2C" if route.h2c else None,
                hsts=route.hsts,
                protocol=route.protocol if route.protocol != "HTTP" else None,
                port=route.port,
                proxy_protocol=route.proxy_protocol if route.proxy_protocol != "None" else None,
                rules=list(route.rules) if route.rules is not None else None,
            )
            if made.rules is not None:
                wire = made.model_dump_json(by_alias=True, exclude_none=True)
                if GatewayTunnel.model_validate_json(wire) != made:
                    return None
            return made
        except ValidationError:
            return None


def agent_inputs(topology: Topology, agent_id: UUID) -> tuple[object, ...]:
    """All of ``topology`` that :func:`agent_config` reads for this agent: equal inputs render
    equal configs, so an edge whose inputs did not change need not be rendered again."""
    return (
        topology.agents.get(agent_id),
        topology.gateways_by_index,
        topology.boots_by_index,
        topology._served_by_agent.get(agent_id, ()),
        topology.backends_of(agent_id),
    )


def gateway_inputs(
    topology: Topology, gateway_id: UUID, with_certificates: bool = True
) -> tuple[object, ...]:
    """All of ``topology`` that :func:`gateway_config` reads (see :func:`agent_inputs`).
    Comparing two of them is cheap when nothing changed: the parts are the same objects."""
    return (
        topology.gateways.get(gateway_id),
        topology.agents_by_subnet,
        topology.routes,
        topology.certificates if with_certificates else None,
        topology.challenges,
    )


def agent_config(
    topology: Topology, agent_id: UUID, version: int, private_key: str | None = None
) -> AgentConfig:
    agent = topology.agents[agent_id]
    peers = topology._gateway_peers
    return AgentConfig(
        version=version,
        agent=AgentSelf(
            id=agent.id,
            virtual_ip=agent.virtual_ip,
            subnet=agent.subnet,
            wireguard_private_key=private_key,
        ),
        gateways=[
            peers[gateway.id].model_copy(
                update={
                    "address": addressing.gateway_address_text(agent.subnet_number, gateway.index)
                }
            )
            for gateway in topology.gateways_by_index
        ],
        tunnels=[
            AgentTunnel(
                domain=route.domain,
                target=route.target,
                enabled=route.enabled,
                protocol=route.protocol if route.protocol != "HTTP" else None,
                port=route.port,
                proxy_protocol=route.proxy_protocol if route.proxy_protocol != "None" else None,
                # (a TLSRoute's host, a TCPRoute's port: to its backends' endpoints)
                backend=route.backends[0] if route.backends else None,
                shares=[WeightedBackend(stream=s, weight=w) for s, w in route.shares] or None,
            )
            for route in topology.served_routes_of(agent_id)
            if route.rules is None  # (an HTTP route's host is served through its backends)
        ],
        backends=[
            AgentBackend(name=name, endpoints=list(endpoints))
            for name, endpoints in topology.backends_of(agent_id)
        ]
        or None,
    )


def gateway_config(
    topology: Topology,
    gateway_id: UUID,
    version: int,
    private_key: str | None = None,
    with_certificates: bool = True,
) -> GatewayConfig:
    """The gateway's config; ``with_certificates=False`` leaves out the TLS certificates and
    their private keys (for connections that are neither TLS nor loopback)."""
    gateway = topology.gateways[gateway_id]
    return GatewayConfig(
        version=version,
        gateway=GatewaySelf(
            id=gateway.id,
            public_ip=gateway.public_ip,
            name=gateway.name,
            index=gateway.index,
            wireguard_port=gateway.wireguard_port,
            http_port=gateway.http_port,
            https_port=gateway.https_port,
            trusted_proxies=list(gateway.trusted_proxies) or None,
            client_limits=gateway.client_limits,
            accept_proxy_protocol=gateway.accept_proxy_protocol or None,
            wireguard_private_key=private_key,
        ),
        agents=[
            AgentPeer(
                id=agent.id,
                virtual_ip=agent.virtual_ip,
                subnet=agent.subnet,
                wireguard_public_key=agent.public_key,
                address=addressing.gateway_address_text(agent.subnet_number, gateway.index),
            )
            for agent in topology.agents_by_subnet
        ],
        tunnels=list(topology._gateway_tunnels),
        certificates=list(topology.served_certificates) if with_certificates else [],
        acme_challenges=list(topology.challenges),
    )


EdgeRole = Literal["agent", "gateway"]


def serves(topology: Topology, role: EdgeRole, edge_id: UUID) -> bool:
    """Whether the edge has what a config needs (an Agent its subnet, a gateway instance its
    public address)."""
    return edge_id in (topology.agents if role == "agent" else topology.gateways)


def edge_inputs(
    topology: Topology, role: EdgeRole, edge_id: UUID, with_certificates: bool
) -> tuple[object, ...]:
    """What the edge's config is rendered from (:func:`agent_inputs`, :func:`gateway_inputs`)."""
    if role == "agent":
        return agent_inputs(topology, edge_id)
    return gateway_inputs(topology, edge_id, with_certificates=with_certificates)


def edge_config(
    topology: Topology,
    role: EdgeRole,
    edge_id: UUID,
    private_key: str | None,
    with_certificates: bool,
    heartbeat_seconds: float,
) -> AgentConfig | GatewayConfig:
    """The edge's config, version 0 (the channel numbers what it sends)."""
    rendered: AgentConfig | GatewayConfig
    if role == "agent":
        rendered = agent_config(topology, edge_id, 0, private_key)
    else:
        rendered = gateway_config(
            topology, edge_id, 0, private_key, with_certificates=with_certificates
        )
    rendered.heartbeat_seconds = heartbeat_seconds
    return rendered
