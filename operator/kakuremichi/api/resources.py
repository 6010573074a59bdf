"""The custom resources: Agent, Gateway, Tunnel, Certificate and TenantPolicy.

These models are the single definition of each resource: the operator parses objects with them and
``kakuremichi crds`` generates the CRD YAML from them (:mod:`kakuremichi.api.crd`). Everything the
data-model document calls generated (API keys, WireGuard keys, subnets, addresses) lives in status,
never in spec, so a user's manifest holds only intent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import ConfigDict, Field, model_validator

from kakuremichi.api import validation
from kakuremichi.api.conditions import Condition
from kakuremichi.api.fields import (
    CamelModel,
    CidrRange,
    DomainName,
    DomainPattern,
    NamespaceName,
    PublicIPv4,
    Quantity,
    RegionName,
    ResourceName,
    SecretName,
    TargetAddress,
    cel_rule,
)

GROUP = "kakuremichi.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kakuremichi"

EdgeState = Literal["online", "offline", "error"]
StatusText15 = Annotated[str, Field(max_length=15)]
"""An address in status: written by the operator from a checked one (no rule to evaluate at
every status write)."""
Port = Annotated[int, Field(ge=1, le=65535)]


class CommonStatus(CamelModel):
    """Fields every kind reports."""

    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Current state; ``Ready`` summarises it."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` this status was computed from."""


class EdgeClient(CamelModel):
    """What an edge reported about itself when it last connected."""

    version: Annotated[str, Field(max_length=64)] | None = None
    os: Annotated[str, Field(max_length=128)] | None = None
    hostname: Annotated[str, Field(max_length=253)] | None = None
    wireguard_mode: Literal["kernel", "userspace"] | None = None
    boot_id: Annotated[str, Field(max_length=64)] | None = None
    """Random at each start of the edge process: a gateway's tells its agents that their
    WireGuard sessions with it are gone (it restarted), so they start new ones at once."""


class EdgeStatus(CommonStatus):
    """Status shared by the two kinds of edge (agents and gateways)."""

    state: EdgeState = "offline"
    """Connection state of the edge: online, offline or error."""
    last_seen_at: datetime | None = None
    """Last time the edge was heard from on the control channel."""
    credentials_secret: Annotated[str, Field(max_length=253)] | None = None
    """Secret holding the API key and the WireGuard private key."""
    client: EdgeClient | None = None
    """Version, OS and WireGuard mode the edge reported."""


# --- Agent -------------------------------------------------------------------------------------


class AgentSpec(CamelModel):
    """An agent runs beside the origin and carries its tunnels' traffic over WireGuard."""

    display_name: Annotated[str, Field(max_length=128)] | None = None
    """Free-form name shown to people, e.g. "home server"."""


class AgentStatus(EdgeStatus):
    """Generated identity and connection state of an agent."""

    subnet: Annotated[str, Field(max_length=18)] | None = None
    """The agent's own /24, e.g. 10.1.0.0/24 (allocated by the operator; 10.N.M.0/24 with M > 0
    only in an enlarged pool)."""
    virtual_ip: Annotated[str, Field(max_length=15)] | None = Field(default=None, alias="virtualIP")
    """The agent's WireGuard address, e.g. 10.1.0.100 (the .100 of its subnet)."""
    wireguard_public_key: Annotated[str, Field(max_length=64)] | None = None
    """The agent's WireGuard public key."""


# --- Gateway -----------------------------------------------------------------------------------


class Toleration(CamelModel):
    """A toleration for the gateway DaemonSet's pods (as in a Pod spec)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


GATEWAY_MEMORY_PER_PROCESS = "128Mi"
"""Memory limit per HTTPS process of a gateway: ``--workers auto`` runs one per this much."""


class ResourceRequests(CamelModel):
    """What the scheduler reserves on the node for each gateway pod."""

    cpu: Quantity | None = "50m"
    memory: Quantity | None = "64Mi"


class ResourceLimits(CamelModel):
    """The most each gateway pod may use. The gateway serves HTTPS from one process per CPU
    these allow and per 128Mi of memory (at least one)."""

    cpu: Quantity | None = None
    """Unset by default: the gateway may use every CPU of its node."""
    memory: Quantity = "256Mi"
    """At least 128Mi."""


def _quantity_rule(left: str, operator: str, right: str) -> str:
    """CEL: ``left operator right``, each a field path under ``self`` (``requests.cpu``) or a
    quoted literal (``'128Mi'``); it holds while a field is unset or malformed (the pattern
    reports malformed ones)."""
    fields = [side for side in (left, right) if not side.startswith("'")]
    checks = [f"!has(self.{path.split('.')[0]}) || !has(self.{path})" for path in fields]
    checks += [f"!isQuantity(string(self.{path}))" for path in fields]

    def amount(side: str) -> str:
        return f"quantity({side})" if side.startswith("'") else f"quantity(string(self.{side}))"

    return " || ".join([*checks, f"{amount(left)}.compareTo({amount(right)}) {operator} 0"])


class GatewayResources(CamelModel):
    """CPU and memory of each pod of an InCluster pool (as in a container's ``resources``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    _quantity_rule("requests.cpu", "<=", "limits.cpu"),
                    "requests.cpu must not exceed limits.cpu", ".requests.cpu",
                ),
                cel_rule(
                    _quantity_rule("requests.memory", "<=", "limits.memory"),
                    "requests.memory must not exceed limits.memory", ".requests.memory",
                ),
                cel_rule(
                    _quantity_rule("limits.memory", ">=", f"'{GATEWAY_MEMORY_PER_PROCESS}'"),
                    f"limits.memory must be at least {GATEWAY_MEMORY_PER_PROCESS}",
                    ".limits.memory",
                ),
            ]
        }
    )  # fmt: skip

    requests: ResourceRequests = Field(
        default_factory=ResourceRequests, json_schema_extra={"default": {}}
    )
    limits: ResourceLimits = Field(
        default_factory=ResourceLimits, json_schema_extra={"default": {}}
    )

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Self:
        amount = validation.quantity_amount
        for resource in ("cpu", "memory"):
            requested = getattr(self.requests, resource)
            limit = getattr(self.limits, resource)
            if requested is not None and limit is not None and amount(requested) > amount(limit):
                raise ValueError(f"requests.{resource} must not exceed limits.{resource}")
        if amount(self.limits.memory) < amount(GATEWAY_MEMORY_PER_PROCESS):
            raise ValueError(f"limits.memory must be at least {GATEWAY_MEMORY_PER_PROCESS}")
        return self

    def as_container_resources(self) -> dict[str, dict[str, str]]:
        """The ``resources`` of the gateway container."""
        return self.model_dump(exclude_none=True)


class GatewayPorts(CamelModel):
    """Ports a gateway listens on, on its host's network."""

    http: Port = 80
    """Plain HTTP: ACME HTTP-01 challenges and the redirect to HTTPS."""
    https: Port = 443
    """HTTPS, where tunnels are served."""
    wireguard: Port = 51820
    """WireGuard UDP port agents connect to."""

    @model_validator(mode="after")
    def _distinct_tcp_ports(self) -> Self:
        if self.http == self.https:
            raise ValueError("http and https must be different ports")
        return self


_RANGE_ORDER = "last must not be below first"


class PortRange(CamelModel):
    """Ports first to last, both included."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "x-kubernetes-validations": [cel_rule("self.first <= self.last", _RANGE_ORDER, ".last")]
        },
    )

    first: Port
    last: Port

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.first > self.last:
            raise ValueError(_RANGE_ORDER)
        return self

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


class ClientLimits(CamelModel):
    """What one client may hold of a gateway's HTTPS front end. Each limit is enforced while
    reading (an oversized head is refused at its limit, not when it ends) and each refusal is
    counted in ``/metrics`` (``kakuremichi_gateway_limit_hits``)."""

    model_config = ConfigDict(frozen=True)

    max_head_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    """Bytes of a request head (request line and header fields): more is answered 431."""
    max_header_fields: Annotated[int, Field(ge=8, le=1000)] = 100
    """Header fields of one request: more is answered 431."""
    max_target_bytes: Annotated[int, Field(ge=256, le=64 * 1024)] = 8 * 1024
    """Length of the request target (path and query): longer is answered 414."""
    head_timeout_seconds: Annotated[float, Field(ge=1, le=300)] = 20
    """A request head must arrive whole within this time of its first byte; else it is
    answered 408 and the connection closed."""
    handshake_timeout_seconds: Annotated[float, Field(ge=1, le=120)] = 10
    """The TLS handshake must end within this time of the TCP connection."""
    keep_alive_timeout_seconds: Annotated[float, Field(ge=1, le=3600)] = 75
    """A connection idle this long between requests (or inside a request body) is closed."""
    upgraded_idle_timeout_seconds: Annotated[float, Field(ge=10, le=86400)] = 3600
    """An upgraded (WebSocket) connection with no traffic either way this long is closed."""
    max_connections_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    """Open connections from one client address (IPv6: one /64) per HTTPS process; more are
    refused at accept. Addresses in ``trustedProxies`` (load balancers) are exempt."""
    max_connections: Annotated[int, Field(ge=1, le=10_000_000)] = 4096
    """Open client connections per HTTPS process; more are refused at accept. The default
    fits the 128Mi each process is given (an idle TLS connection holds ~18 KiB): raise it with
    the pod's memory limit. TCP tunnels' ports count their connections the same way, the two
    caps apart."""
    tcp_idle_timeout_seconds: Annotated[float, Field(ge=10, le=7 * 86400)] = 3600
    """A connection of a TCP or TLS-passthrough tunnel with no traffic either way this long is
    closed."""
    udp_idle_timeout_seconds: Annotated[float, Field(ge=5, le=3600)] = 60
    """A UDP tunnel's flow (one client address and port) with no datagram from its client this
    long is forgotten (answers do not keep it); answers after that no longer reach the
    client."""
    udp_answer_bytes: Annotated[int, Field(ge=1500, le=1024 * 1024)] = 4096
    """Bytes of answers a UDP flow carries per datagram of its client (at least 8 times that
    datagram's size, and at most 64 answers): a tenant's agent answering a forged source address
    cannot make the gateway flood it. Enough for request/answer protocols (DNS, games, QUIC,
    WireGuard); a target that streams to a silent client needs it raised."""
    max_udp_flows: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    """Flows of one UDP tunnel on each gateway; a datagram that would open one more is dropped
    (and counted), so one tunnel's flood never takes another's."""
    max_udp_flows_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 512
    """Flows of one UDP tunnel from one client address (IPv6: one /64) on each gateway, so one
    host cannot take all of a tunnel's flows; trustedProxies are held to maxUdpFlows only."""


class Hsts(CamelModel):
    """``Strict-Transport-Security`` added by the gateways to the tunnel's responses (unless
    the origin sets its own)."""

    model_config = ConfigDict(frozen=True)

    max_age_seconds: Annotated[int, Field(ge=0, le=2 * 365 * 86400)] = 365 * 86400
    """How long browsers remember to use HTTPS only (0 tells them to forget)."""
    include_sub_domains: bool = False
    """Also every name below the tunnel's domain."""

    def header(self) -> bytes:
        return b"Strict-Transport-Security: max-age=%d%s\r\n" % (
            self.max_age_seconds,
            b"; includeSubDomains" if self.include_sub_domains else b"",
        )


GatewayMode = Literal["InCluster", "External"]
_PROXY_NEEDS_TRUST = (
    "acceptProxyProtocol needs trustedProxies: the load balancers whose PROXY headers are believed"
)


class GatewaySpec(CamelModel):
    """A pool of public entry nodes that terminate TLS and forward to agents over WireGuard."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "!has(self.mode) || self.mode == 'InCluster' || ("
                    "(!has(self.nodeSelector) || size(self.nodeSelector) == 0) && "
                    "(!has(self.tolerations) || size(self.tolerations) == 0) && "
                    "!has(self.resources))",
                    "nodeSelector, tolerations and resources apply only to mode InCluster",
                ),
                cel_rule(
                    "!has(self.acceptProxyProtocol) || !self.acceptProxyProtocol || "
                    "(has(self.trustedProxies) && size(self.trustedProxies) > 0)",
                    _PROXY_NEEDS_TRUST,
                    ".acceptProxyProtocol",
                ),
            ]
        }
    )

    mode: GatewayMode = "InCluster"
    """InCluster: a DaemonSet on the selected nodes, one gateway instance per node.
    External: a single host outside the cluster, installed with the one-line installer."""
    public_ip: Annotated[PublicIPv4 | None, Field(alias="publicIP")] = None
    """Public IPv4 address. InCluster: the Node's ExternalIP, else InternalIP, unless pinned
    here (then the pool may have one node). External: from here, else the address the gateway
    first connects from."""
    region: RegionName | None = None
    """Where the gateway runs, e.g. tokyo."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Nodes the DaemonSet runs on (mode InCluster)."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the DaemonSet tolerates (mode InCluster)."""
    ports: GatewayPorts = Field(default_factory=GatewayPorts, json_schema_extra={"default": {}})
    """Listening ports."""
    resources: GatewayResources | None = None
    """CPU and memory of each gateway pod (mode InCluster). Unset: requests 50m CPU and 64Mi,
    limit 256Mi (two HTTPS processes). Raise the limits to serve more from each node."""
    trusted_proxies: Annotated[list[CidrRange], Field(max_length=64)] = Field(default_factory=list)
    """Load balancers in front of the gateways, as CIDR ranges: a connection from one of
    them has the client's ``X-Forwarded-For`` appended to (the nearest address outside these
    ranges becomes ``X-Real-IP``); from anyone else it is replaced. Default: none."""
    tunnel_ports: Annotated[list[PortRange], Field(max_length=64)] = Field(default_factory=list)
    """The ports this pool opens to TCP and UDP Tunnels (both protocols), on its nodes' own
    addresses (InCluster gateways use the host's network): a Tunnel's port outside them is
    PortNotAllowed. Default: none, so no tenant takes a port of the nodes (a kubelet's, a
    CNI's, one a node's service binds after a restart) unless the admin opens a range meant
    for Tunnels, e.g. [{first: 20000, last: 29999}]."""
    accept_proxy_protocol: bool = False
    """The gateways read a PROXY protocol header (v1 or v2, as HAProxy and cloud load
    balancers send it) at the start of each TCP connection from an address in
    ``trustedProxies`` (required then), and take its client address as the connection's: for
    forwarded headers, per-address limits and the PROXY headers agents send on. A connection
    from anyone else that begins with one is refused. Default: false (a header is refused
    from everyone)."""
    client_limits: ClientLimits = Field(
        default_factory=ClientLimits, json_schema_extra={"default": {}}
    )
    """Limits on what one client may hold of each gateway (head sizes, deadlines, connection
    caps)."""

    @model_validator(mode="after")
    def _placement_only_in_cluster(self) -> Self:
        if self.mode == "External" and (
            self.node_selector or self.tolerations or self.resources is not None
        ):
            raise ValueError("nodeSelector, tolerations and resources apply only to mode InCluster")
        if self.accept_proxy_protocol and not self.trusted_proxies:
            raise ValueError(_PROXY_NEEDS_TRUST)
        return self


class GatewayInstanceStatus(CamelModel):
    """One running gateway of the pool (one node of the DaemonSet, or the external host)."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Instance name: the node name for InCluster pools, the Gateway's name for External ones."""
    index: Annotated[int, Field(ge=1, le=99)]
    """Stable gateway index g: the instance's WireGuard address toward the agent of
    10.N.M.0/24 is 10.N.M.g."""
    public_ip: Annotated[StatusText15 | None, Field(alias="publicIP")] = None
    """The instance's public address."""
    wireguard_public_key: Annotated[str, Field(max_length=64)] | None = None
    """The instance's WireGuard public key."""
    state: EdgeState = "offline"
    """Connection state."""
    last_seen_at: datetime | None = None
    """Last time the instance was heard from."""


class GatewayStatus(EdgeStatus):
    """Connection state of the pool and each of its instances."""

    public_ip: Annotated[StatusText15 | None, Field(alias="publicIP")] = None
    """Public address of the pool (of its first instance when there are several)."""
    instances: list[GatewayInstanceStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """The pool's instances."""


# --- Certificates and Tunnels ------------------------------------------------------------------

Issuer = Literal["ACME", "Secret"]
"""ACME: the operator obtains and renews the certificate and writes it to the Secret.
Secret: the user maintains a kubernetes.io/tls Secret; the operator reads and validates it."""
AppProtocol = Literal["HTTP1", "H2C"]
"""What a tunnel's target speaks: HTTP/1.1, or HTTP/2 without TLS (h2c, e.g. gRPC)."""
TunnelProtocol = Literal["HTTP", "TLS", "TCP", "UDP"]
"""What the gateways do with a tunnel's clients: HTTP (terminate TLS, read requests), TLS (pass
the TLS connection through by its SNI name), TCP or UDP (forward a public port)."""
PortProtocol = Literal["TCP", "UDP"]
"""The protocols whose tunnels have a public port of their own."""
ProxyProtocol = Literal["None", "V1", "V2"]
"""Whether the agent tells the target the client's address with a PROXY protocol header."""
GATEWAY_OWN_PORTS: dict[tuple[PortProtocol, int], str] = {
    ("TCP", 80): "the gateways' HTTP port",
    ("TCP", 443): "the gateways' HTTPS port",
    ("UDP", 8471): "the gateways' relay port (UDP Tunnels' frames inside WireGuard)",
    ("UDP", 51820): "the gateways' WireGuard port",
}
"""The gateways' default ports: a Tunnel may never take them (a pool configured with other
ports reserves those too, decided with the claims: PortConflict)."""

_SECRET_NEEDS_NAME = cel_rule(
    "!has(self.issuer) || self.issuer != 'Secret' || has(self.secretName)",
    "secretName is required when issuer is Secret",
)


class TunnelTLS(CamelModel):
    """How a tunnel's certificate is obtained."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_SECRET_NEEDS_NAME]})

    issuer: Issuer = "ACME"
    """ACME (default): obtained and renewed automatically. Secret: an existing kubernetes.io/tls
    Secret in the tunnel's namespace."""
    secret_name: SecretName | None = None
    """The Secret to read (issuer Secret) or to write (issuer ACME; default <tunnel>-tls)."""

    @model_validator(mode="after")
    def _secret_needs_name(self) -> Self:
        if self.issuer == "Secret" and self.secret_name is None:
            raise ValueError("secretName is required when issuer is Secret")
        return self


_DOMAIN_IMMUTABLE = cel_rule(
    "self.domain == oldSelf.domain",
    "domain cannot be changed: create a new object for another domain (a claim's age is "
    "its object's)",
    ".domain",
)


_PORT_IMMUTABLE = cel_rule(
    "(has(self.protocol) ? self.protocol : 'HTTP') == "
    "(has(oldSelf.protocol) ? oldSelf.protocol : 'HTTP') && "
    "(has(self.port) ? self.port : 0) == (has(oldSelf.port) ? oldSelf.port : 0)",
    "protocol and port cannot be changed: create a new object for another (a claim on a port "
    "dates from its object, as one on a domain does)",
    ".port",
)


@dataclass(frozen=True)
class SpecRule:
    """A rule across fields of a spec, the same in the model and in the CRD schema (CEL), with
    one message for both."""

    cel: str
    message: str
    field_path: str
    broken: Callable[[TunnelSpec], bool]
    """The model's side: true when the rule is broken."""

    def entry(self) -> dict[str, Any]:
        return cel_rule(self.cel, self.message, self.field_path)


def _port_protocol(protocol: str) -> bool:
    return protocol in ("TCP", "UDP")


TUNNEL_RULES: tuple[SpecRule, ...] = (
    SpecRule(
        "!has(self.protocol) || !(self.protocol in ['TCP', 'UDP']) || has(self.port)",
        "port is required for protocol TCP and UDP: the public port the gateways forward",
        ".port",
        lambda spec: _port_protocol(spec.protocol) and spec.port is None,
    ),
    SpecRule(
        "!has(self.port) || (has(self.protocol) && self.protocol in ['TCP', 'UDP'])",
        "port is only for protocol TCP and UDP: HTTP and TLS tunnels are served on the "
        "gateways' HTTPS port, by name",
        ".port",
        lambda spec: spec.port is not None and not _port_protocol(spec.protocol),
    ),
    SpecRule(
        "!has(self.port) || !has(self.protocol) || !("
        "(self.protocol == 'TCP' && (self.port == 80 || self.port == 443)) || "
        "(self.protocol == 'UDP' && (self.port == 8471 || self.port == 51820)))",
        "port must not be one of the gateways' own (80 and 443 TCP, 8471 and 51820 UDP): pick "
        "another",
        ".port",
        lambda spec: (spec.protocol, spec.port) in GATEWAY_OWN_PORTS,
    ),
    SpecRule(
        "!has(self.proxyProtocol) || self.proxyProtocol == 'None' || "
        "(has(self.protocol) && self.protocol != 'HTTP')",
        "proxyProtocol is for protocol TLS, TCP and UDP: HTTP tunnels tell the target the "
        "client's address in X-Forwarded-For",
        ".proxyProtocol",
        lambda spec: spec.proxy_protocol != "None" and spec.protocol == "HTTP",
    ),
    SpecRule(
        "!has(self.proxyProtocol) || self.proxyProtocol != 'V1' || !has(self.protocol) || "
        "self.protocol != 'UDP'",
        "proxyProtocol V1 has no form for UDP: use V2",
        ".proxyProtocol",
        lambda spec: spec.proxy_protocol == "V1" and spec.protocol == "UDP",
    ),
    SpecRule(
        "!has(self.appProtocol) || self.appProtocol != 'H2C' || !has(self.protocol) || "
        "self.protocol == 'HTTP'",
        "appProtocol H2C is for protocol HTTP: TLS, TCP and UDP tunnels pass their bytes on "
        "as they are",
        ".appProtocol",
        lambda spec: spec.app_protocol == "H2C" and spec.protocol != "HTTP",
    ),
)


class TunnelSpec(CamelModel):
    """Publishes ``domain`` on every gateway and forwards it through ``agent`` to ``target``."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _DOMAIN_IMMUTABLE,
                _PORT_IMMUTABLE,
                *(r.entry() for r in TUNNEL_RULES),
            ]
        }
    )

    domain: DomainName
    """Public DNS name, e.g. app.example.com. The oldest claim holds it; it cannot be changed
    (create another Tunnel)."""
    agent: ResourceName
    """Name of the Agent (same namespace) that reaches the target."""
    target: TargetAddress
    """host:port the agent forwards to, e.g. localhost:8080."""
    protocol: TunnelProtocol = "HTTP"
    """HTTP (default): the gateways terminate TLS with the tunnel's certificate and forward
    each request. TLS: the gateways pass the TLS connection through, chosen by the name the
    client asks for (SNI) on their HTTPS port, and never decrypt it: the target holds its own
    certificate. TCP, UDP: the gateways forward ``port`` (tcp://domain:port,
    udp://domain:port). Only HTTP tunnels get a Certificate. Cannot be changed."""
    port: Port | None = None
    """The public port on every gateway, for protocol TCP and UDP (required there, refused
    otherwise). Not 80 or 443 (TCP) or 8471 or 51820 (UDP), nor a port a Gateway pool uses
    or does not open to Tunnels (its tunnelPorts); the oldest claim on a protocol and port
    holds it (others: PortConflict). Protocol and port cannot be changed."""
    proxy_protocol: ProxyProtocol = "None"
    """V1 or V2: the agent begins each connection to the target (TLS, TCP) with a PROXY
    protocol header carrying the client's address and port, as HAProxy defines it; for UDP
    (V2 only) every datagram carries one. The target must expect it (nginx: ``listen ...
    proxy_protocol``). Not for HTTP tunnels, which carry X-Forwarded-For."""
    app_protocol: AppProtocol = "HTTP1"
    """What the target speaks (protocol HTTP). HTTP1 (default): HTTP/1.1; the gateway reads each
    request and adds X-Forwarded-For/-Proto/-Host. H2C: HTTP/2 without TLS, as gRPC servers
    speak it; clients must negotiate HTTP/2 (ALPN h2) and their connection is passed to the
    target as it is, without X-Forwarded-* headers."""
    enabled: bool = True
    """When false the tunnel is kept but not routed."""
    description: Annotated[str, Field(max_length=1024)] | None = None
    """Free-form note."""
    tls: TunnelTLS = Field(default_factory=TunnelTLS, json_schema_extra={"default": {}})
    """Certificate source (protocol HTTP; ignored otherwise)."""
    hsts: Hsts | None = None
    """Add ``Strict-Transport-Security`` to the tunnel's responses (HTTP1 tunnels). Unset:
    the origin's own header, if any, is all browsers see."""

    @model_validator(mode="after")
    def _fields_fit_the_protocol(self) -> Self:
        for rule in TUNNEL_RULES:
            if rule.broken(self):
                raise ValueError(rule.message)
        return self

    @property
    def public_port(self) -> tuple[PortProtocol, int] | None:
        """(TCP or UDP, port) for a tunnel with a port of its own."""
        if self.port is not None and self.protocol in ("TCP", "UDP"):
            return ("TCP" if self.protocol == "TCP" else "UDP"), self.port
        return None


class TunnelClaim(CamelModel):
    """When the Tunnel's claim on its domain began (the older claim holds), sealed by the
    operator so that nobody who can write status can date a claim back."""

    since: datetime
    proof: Annotated[str, Field(max_length=128)]


class TunnelStatus(CommonStatus):
    """Where the tunnel is published and whether it serves."""

    claim: TunnelClaim | None = None
    """Set while the Tunnel claims its domain (it holds it, or waits behind an older claim)."""

    url: Annotated[str, Field(max_length=300)] | None = None
    """The public URL, e.g. https://app.example.com."""
    certificate: Annotated[str, Field(max_length=64)] | None = None
    """Name of the Certificate resource that serves this tunnel."""


class CertificateSpec(CamelModel):
    """A TLS certificate for one domain, served by every gateway."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [_SECRET_NEEDS_NAME, _DOMAIN_IMMUTABLE]}
    )

    domain: DomainName
    """The DNS name the certificate is for."""
    secret_name: SecretName
    """kubernetes.io/tls Secret holding tls.crt and tls.key."""
    issuer: Issuer = "ACME"
    """ACME (default) or Secret (user-maintained)."""
    auto_renew: bool = True
    """Renew before expiry (issuer ACME)."""


class CertificateStatus(CommonStatus):
    """Validity of the certificate currently served."""

    not_before: datetime | None = None
    """Start of validity."""
    not_after: datetime | None = None
    """Expiry."""
    renewal_time: datetime | None = None
    """When renewal is due."""
    last_renewed_at: datetime | None = None
    """When the certificate was last issued or renewed."""
    order_url: Annotated[str, Field(max_length=2048)] | None = None
    """The ACME order in progress, kept so that a restart resumes it."""
    failed_attempts: Annotated[int, Field(ge=0)] | None = None
    """ACME attempts that failed in a row (they are retried with growing delays)."""
    next_attempt_at: datetime | None = None
    """When the next ACME attempt is due after a failure."""


# --- TenantPolicy ------------------------------------------------------------------------------


class NamespaceSelector(CamelModel):
    """The namespaces a TenantPolicy applies to: those named, and those whose labels match."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "(has(self.matchNames) && size(self.matchNames) > 0) || has(self.matchLabels)",
                    "give matchNames, matchLabels or both",
                )
            ]
        }
    )

    match_names: list[NamespaceName] = Field(default_factory=list, max_length=1024)
    """Namespaces selected by name."""
    match_labels: Annotated[dict[str, str], Field(max_length=64)] | None = None
    """Namespaces whose labels include all of these. ``{}`` selects every namespace."""

    @model_validator(mode="after")
    def _something_selected(self) -> Self:
        if not self.match_names and self.match_labels is None:
            raise ValueError("give matchNames, matchLabels or both")
        return self


class TenantPolicySpec(CamelModel):
    """What the selected namespaces may claim, and how much they may run. With no TenantPolicy
    in the cluster every namespace may claim any domain (the first claim holds); once there is
    one, a namespace may claim only the domains of the policies that select it, and one that
    none selects may claim no domain and run no Agent."""

    namespaces: NamespaceSelector
    """The namespaces this policy applies to."""
    domains: list[DomainPattern] = Field(default_factory=list, max_length=1024)
    """Domains the selected namespaces may claim: exact names (app.example.com) and
    *.example.com for every name below example.com."""
    ports: list[PortRange] = Field(default_factory=list, max_length=64)
    """Public ports the selected namespaces' TCPRoutes and UDPRoutes may claim (a Gateway pool
    must open them too: its ``tunnelPorts``); none unless listed. A TCP or UDP Tunnel claims its
    port with its domain, which ``domains`` governs."""
    max_agents: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    """Agents each selected namespace may run (the oldest count; the others get no subnet).
    Several policies selecting a namespace: the smallest limit applies."""
    max_tunnels: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    """Tunnels each selected namespace may have (the oldest count; the others are not
    routed). Several policies selecting a namespace: the smallest limit applies."""


class TenantPolicyStatus(CommonStatus):
    """Whether the operator applies the policy."""


# --- Objects -----------------------------------------------------------------------------------


class ObjectMeta(CamelModel):
    """The parts of ``metadata`` the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: ResourceName
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


SpecT = TypeVar("SpecT", bound=CamelModel)
StatusT = TypeVar("StatusT", bound=CommonStatus)


class Resource(CamelModel, Generic[SpecT, StatusT]):
    """A whole custom object as the API server returns it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kakuremichi.io/v1alpha1"] = "kakuremichi.io/v1alpha1"
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT | None = None


Agent = Resource[AgentSpec, AgentStatus]
Gateway = Resource[GatewaySpec, GatewayStatus]
Tunnel = Resource[TunnelSpec, TunnelStatus]
Certificate = Resource[CertificateSpec, CertificateStatus]
TenantPolicy = Resource[TenantPolicySpec, TenantPolicyStatus]


# --- Definitions for the CRDs ------------------------------------------------------------------


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    priority: int = 0
    description: str = ""

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.priority:
            column["priority"] = self.priority
        if self.description:
            column["description"] = self.description
        return column


READY_COLUMN = PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status')
REASON_COLUMN = PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason')
"""Shown by default: READY False says little without why (AgentOffline, DomainConflict ...)."""
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class ResourceKind:
    """Everything that names a kind in the API."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    namespaced: bool
    model: type[Resource[Any, Any]]
    spec: type[CamelModel]
    status: type[CommonStatus]
    columns: tuple[PrinterColumn, ...]
    spec_required: bool = True
    categories: tuple[str, ...] = field(default=(CATEGORY,))

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def api_version(self) -> str:
        return API_VERSION


AGENT = ResourceKind(
    kind="Agent",
    plural="agents",
    short_names=("kmagent",),
    namespaced=True,
    model=Agent,
    spec=AgentSpec,
    status=AgentStatus,
    spec_required=False,
    columns=(
        PrinterColumn("Subnet", ".status.subnet"),
        PrinterColumn("Virtual IP", ".status.virtualIP"),
        PrinterColumn("State", ".status.state"),
        PrinterColumn("Last Seen", ".status.lastSeenAt", "date"),
        READY_COLUMN,
        REASON_COLUMN,
        AGE_COLUMN,
    ),
)

GATEWAY = ResourceKind(
    kind="Gateway",
    plural="gateways",
    short_names=("kmgw",),
    namespaced=False,
    model=Gateway,
    spec=GatewaySpec,
    status=GatewayStatus,
    spec_required=False,
    columns=(
        PrinterColumn("Mode", ".spec.mode"),
        PrinterColumn("Public IP", ".status.publicIP"),
        PrinterColumn("Region", ".spec.region"),
        PrinterColumn("State", ".status.state"),
        PrinterColumn("Last Seen", ".status.lastSeenAt", "date"),
        READY_COLUMN,
        REASON_COLUMN,
        AGE_COLUMN,
    ),
)

TUNNEL = ResourceKind(
    kind="Tunnel",
    plural="tunnels",
    short_names=("kmtunnel", "kmtun"),
    namespaced=True,
    model=Tunnel,
    spec=TunnelSpec,
    status=TunnelStatus,
    columns=(
        PrinterColumn("Domain", ".spec.domain"),
        PrinterColumn("Protocol", ".spec.protocol"),
        PrinterColumn("Port", ".spec.port", "integer"),
        PrinterColumn("Agent", ".spec.agent"),
        PrinterColumn("Target", ".spec.target"),
        PrinterColumn("Enabled", ".spec.enabled", "boolean", priority=1),
        READY_COLUMN,
        REASON_COLUMN,
        PrinterColumn("URL", ".status.url", priority=1),
        AGE_COLUMN,
    ),
)

CERTIFICATE = ResourceKind(
    kind="Certificate",
    plural="certificates",
    short_names=("kmcert",),
    namespaced=True,
    model=Certificate,
    spec=CertificateSpec,
    status=CertificateStatus,
    columns=(
        PrinterColumn("Domain", ".spec.domain"),
        PrinterColumn("Issuer", ".spec.issuer"),
        PrinterColumn("Secret", ".spec.secretName", priority=1),
        READY_COLUMN,
        REASON_COLUMN,
        # (kubectl shows a "date" column in the future as <invalid>: these stay timestamps.)
        PrinterColumn("Expires", ".status.notAfter"),
        PrinterColumn("Renewal", ".status.renewalTime", priority=1),
        AGE_COLUMN,
    ),
)

TENANT_POLICY = ResourceKind(
    kind="TenantPolicy",
    plural="tenantpolicies",
    short_names=("kmtenant",),
    namespaced=False,
    model=TenantPolicy,
    spec=TenantPolicySpec,
    status=TenantPolicyStatus,
    columns=(
        PrinterColumn("Max Agents", ".spec.maxAgents", "integer"),
        PrinterColumn("Max Tunnels", ".spec.maxTunnels", "integer"),
        PrinterColumn("Domains", ".spec.domains", priority=1),
        READY_COLUMN,
        AGE_COLUMN,
    ),
)

KINDS: tuple[ResourceKind, ...] = (AGENT, GATEWAY, TUNNEL, CERTIFICATE, TENANT_POLICY)
