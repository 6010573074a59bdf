"""What a gateway serves, in one shape from control's config to the proxies: a route per domain
(HTTP and TLS-passthrough Tunnels on the HTTPS port, TCP and UDP Tunnels on ports of their own),
the certificates, and the front end's limits and trusted proxies.

The gateway process and each of its HTTPS worker processes get the same
:class:`FrontEndConfig` (the workers over a pipe, as JSON) and serve it the same way
(``edge/front_end.py``).
"""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field

from kakuremichi.api.protocol import CertificateBundle, GatewayConfig, GatewayTunnel, RequestRule
from kakuremichi.api.resources import ClientLimits, Hsts, TunnelProtocol
from kakuremichi.edge.request_routing import RequestRouter


class GatewayRoute(BaseModel):
    """Where one domain's requests go."""

    model_config = ConfigDict(frozen=True)

    domain: str
    agent_ip: str | None
    """None: the Tunnel holding the domain has no agent now. Its requests get 503; the domain
    never goes to another tunnel meanwhile."""
    enabled: bool = True
    h2c: bool = False
    """The target speaks HTTP/2 without TLS: HTTP/2 clients are passed through."""
    hsts: Hsts | None = None
    protocol: TunnelProtocol = "HTTP"
    port: int | None = None
    """TCP, UDP: the public port."""
    client_address: bool = False
    """Tell the agent the client's address when opening a stream (its Tunnel wants a PROXY
    header); left out otherwise, which agents of every release understand."""
    rules: tuple[RequestRule, ...] | None = None
    """HTTP from routes (Ingress, HTTPRoute): each request goes to the backend its rules choose
    (:mod:`kakuremichi.edge.request_routing`); with ``h2c`` (a GRPCRoute's host), each call.
    None: to the stream named by the domain."""

    @classmethod
    def of(cls, tunnel: GatewayTunnel) -> GatewayRoute:
        return cls(
            domain=tunnel.domain,
            agent_ip=tunnel.agent_virtual_ip,
            enabled=tunnel.enabled,
            h2c=tunnel.app_protocol == "H2C",
            hsts=tunnel.hsts,
            protocol=tunnel.protocol or "HTTP",
            port=tunnel.port,
            client_address=bool(tunnel.proxy_protocol and tunnel.proxy_protocol != "None"),
            rules=tuple(tunnel.rules) if tunnel.rules is not None else None,
        )

    @property
    def serving(self) -> bool:
        """Enabled and with an agent to go to."""
        return self.enabled and self.agent_ip is not None

    @cached_property
    def router(self) -> RequestRouter | None:
        """The rules, compiled once per config (None: a Tunnel's domain, no rules)."""
        return RequestRouter(self.rules) if self.rules is not None else None

    def serves_stream(self, stream: str) -> bool:
        """Whether a stream named ``stream`` is still one this route's requests go to."""
        router = self.router
        return stream == self.domain if router is None else stream in router.streams

    @cached_property
    def hsts_line(self) -> bytes | None:
        """The ``Strict-Transport-Security`` field line added to responses that have none."""
        return self.hsts.header() if self.hsts is not None else None


class FrontEndConfig(BaseModel):
    """Everything the HTTPS port serves."""

    model_config = ConfigDict(frozen=True)

    routes: list[GatewayRoute] = Field(default_factory=list)
    certificates: list[CertificateBundle] = Field(default_factory=list)
    client_limits: ClientLimits | None = None
    trusted_proxies: list[str] = Field(default_factory=list)

    accept_proxy_protocol: bool = False

    @classmethod
    def of(cls, config: GatewayConfig) -> FrontEndConfig:
        return cls(
            routes=[GatewayRoute.of(t) for t in config.tunnels],
            certificates=list(config.certificates),
            client_limits=config.gateway.client_limits,
            trusted_proxies=list(config.gateway.trusted_proxies or []),
            accept_proxy_protocol=bool(config.gateway.accept_proxy_protocol),
        )

    def h2c_domains(self) -> set[str]:
        """The domains whose targets speak h2c: their TLS offers HTTP/2 (with rules: a
        GRPCRoute's host, its calls routed one by one)."""
        return {r.domain.lower() for r in self.routes if r.h2c and r.protocol == "HTTP"}
