"""Messages of the control channel: a WebSocket between the operator and every edge.

The ``config`` messages keep the data-model document's shape (``{"type": "config", "data": {...}}``
with every field it lists, under its name) and add what the edges need beyond it: a version, each
gateway's WireGuard endpoint port and its address toward the agent, tunnel ``enabled``, and pending
ACME HTTP-01 tokens. ``docs/protocol.md`` describes the exchange.

Frames are JSON text. An edge's first frame is ``auth``; until it is accepted nothing else is read.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from kakuremichi.api.fields import CamelModel, CidrRange, DomainName, PublicIPv4, TargetAddress
from kakuremichi.api.resources import (
    AppProtocol,
    ClientLimits,
    EdgeClient,
    Hsts,
    PortProtocol,
    ProxyProtocol,
    TunnelProtocol,
)

# A first frame larger than this is refused before it is parsed.
MAX_AUTH_FRAME_BYTES = 4096
MAX_POD_TOKEN_BYTES = 3072
"""A projected ServiceAccount token is about 1 KiB (a few hundred bytes more with a 4096-bit
signing key); it has to fit into the first frame beside the key."""
POD_TOKEN_AUDIENCE = "kakuremichi"  # noqa: S105 - an audience name
"""The audience of the gateway pods' projected ServiceAccount tokens."""
NO_WIREGUARD = (
    "no WireGuard here: the kernel has no WireGuard module and wireguard-go is not installed "
    "(load the module: modprobe wireguard; or install wireguard-go, e.g. with the one-line "
    "installer of a control plane that serves its build, or from https://git.zx2c4.com/wireguard-go)"
)
"""What an edge (and its installer) says, in one line, on a host where it cannot run WireGuard;
both then exit with status 4."""
EXIT_NO_WIREGUARD = 4
# WebSocket close codes (the 4000-4999 range is for applications).
CLOSE_UNAUTHORIZED = 4401
CLOSE_BAD_REQUEST = 4400
CLOSE_REPLACED = 4409
CLOSE_TIMEOUT = 4408
CLOSE_TRY_AGAIN = 4503
"""Control has just started and does not know every key yet: come back in a second or two."""
# How often an edge says it is alive, unless control's config says otherwise (control sets it
# to a third of its heartbeat timeout).
DEFAULT_HEARTBEAT_SECONDS = 10.0

WireGuardMode = Literal["kernel", "userspace"]
ApiKey = Annotated[str, Field(min_length=1, max_length=128)]
WireGuardKey = Annotated[str, Field(min_length=44, max_length=44, pattern=r"^[A-Za-z0-9+/]{43}=$")]
IPv4Text = Annotated[str, Field(max_length=15)]
CidrText = Annotated[str, Field(max_length=18)]
Port = Annotated[int, Field(ge=1, le=65535)]
ConfigVersion = Annotated[int, Field(ge=0)]
HeartbeatSeconds = Annotated[float, Field(gt=0, le=3600)]


# --- What an edge sends ------------------------------------------------------------------------


ClientInfo = EdgeClient
"""What an edge says about itself; lands in the ``metadata`` column and in ``status.client``."""


class AuthMessage(CamelModel):
    """First frame of every connection."""

    type: Literal["auth"] = "auth"
    api_key: ApiKey
    node_name: Annotated[str, Field(max_length=253)] | None = None
    """Set by in-cluster gateway pods with the pool's key: the node they run on. Control answers
    with an ``identity`` for that node once ``pod_token`` proves the pod."""
    pod_token: Annotated[str, Field(min_length=1, max_length=MAX_POD_TOKEN_BYTES)] | None = None
    """The gateway pod's projected ServiceAccount token (audience ``kakuremichi``, bound to the
    pod): control checks it with a TokenReview, and the pod against its pool's DaemonSet and the
    node claimed. The pool's key alone yields no node's identity."""
    client: ClientInfo | None = None


class HeartbeatMessage(CamelModel):
    """Sent periodically by an edge; keeps ``lastSeenAt`` fresh."""

    type: Literal["heartbeat"] = "heartbeat"
    sent_at: datetime | None = None


class AckMessage(CamelModel):
    """An edge's answer to a ``config``: applied, or refused with the reason."""

    type: Literal["ack"] = "ack"
    version: ConfigVersion
    ok: bool = True
    error: Annotated[str, Field(max_length=4096)] | None = None


class PeerStatus(CamelModel):
    public_key: WireGuardKey
    latest_handshake_at: datetime | None = None
    rx_bytes: Annotated[int, Field(ge=0)] = 0
    tx_bytes: Annotated[int, Field(ge=0)] = 0


class PortTrouble(CamelModel):
    """A tunnel's public port the gateway cannot bind (it retries)."""

    protocol: PortProtocol
    port: Port
    error: Annotated[str, Field(max_length=256)]


MAX_PORT_TROUBLES = 1024


class StatusReport(CamelModel):
    """Periodic report of an edge's health."""

    client: ClientInfo = Field(default_factory=ClientInfo)
    config_version: ConfigVersion | None = None
    """The last config version the edge applied."""
    state: Literal["online", "error"] = "online"
    error: Annotated[str, Field(max_length=4096)] | None = None
    peers: list[PeerStatus] = Field(default_factory=list)
    tunnels: Annotated[int, Field(ge=0)] = 0
    active_connections: Annotated[int, Field(ge=0)] = 0
    requests_total: Annotated[int, Field(ge=0)] = 0
    unavailable_ports: Annotated[list[PortTrouble], Field(max_length=MAX_PORT_TROUBLES)] = Field(
        default_factory=list
    )
    """A gateway's: the tunnel ports of its config it could not bind, as of now."""


class StatusMessage(CamelModel):
    type: Literal["status"] = "status"
    data: StatusReport


ClientMessage = Annotated[
    AuthMessage | HeartbeatMessage | AckMessage | StatusMessage, Field(discriminator="type")
]
client_message: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


class FromControl(CamelModel):
    """What control sends: edges read it tolerantly, ignoring fields they do not know, so a
    newer control that adds a field (say a Tunnel's appProtocol) does not make an older edge
    refuse every config from then on; it serves what it understands. (What edges send, above,
    stays strict: control refuses what it does not expect.)"""

    model_config = ConfigDict(extra="ignore")


log = logging.getLogger(__name__)


def _each_on_its_own(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    """A config's entries read one by one: an entry an edge cannot read (a newer control's, or a
    tenant's route that slipped past control's checks) is left out, and the rest applied. A whole
    config refused would keep every tenant's routes and certificates as they were."""
    try:
        return handler(value)  # (the whole list at once, when it reads: the usual case, fast)
    except ValidationError:
        if not isinstance(value, list):
            raise
    kept: list[object] = []
    for item in value:
        try:
            kept.extend(handler([item]))
        except ValidationError as error:
            log.warning("left out an entry of a config from control: %s", error.errors()[:1])
    return kept


EachOnItsOwn = WrapValidator(_each_on_its_own)


BackendName = Annotated[
    str,
    Field(
        max_length=137,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?:[0-9]{1,5}(/udp)?$",
    ),
]
"""``namespace/service:port``: the name of a stream to a route's backend (a domain, which names
a Tunnel's streams, never has a ``/``); ``namespace/service:port/udp`` names a UDP port's
backend (a UDPRoute's), which the agent sends datagrams to."""

# --- What control sends to an agent ------------------------------------------------------------


class AgentSelf(FromControl):
    id: UUID
    virtual_ip: IPv4Text
    """e.g. 10.1.0.100"""
    subnet: CidrText
    """e.g. 10.1.0.0/24"""
    wireguard_private_key: WireGuardKey | None = None
    """Sent only over TLS (or loopback with ``--trust-loopback``), to edges that do not already
    hold it."""


class GatewayPeer(FromControl):
    """A gateway as an agent sees it: a WireGuard peer to dial."""

    id: UUID
    public_ip: PublicIPv4
    wireguard_public_key: WireGuardKey
    wireguard_port: Port = 51820
    address: IPv4Text
    """The gateway's WireGuard address inside this agent's subnet (10.N.M.g)."""
    boot: Annotated[str, Field(max_length=64)] | None = None
    """The gateway process's boot id: when it changes, the gateway restarted and its WireGuard
    sessions are gone; the agent starts a new one at once (behind NAT, the gateway cannot)."""


class WeightedBackend(FromControl):
    stream: BackendName | None = None
    """None (left out of the message, as every None is): this share of requests is answered
    500 (an HTTPRoute's backendRef that does not resolve takes its weight's share, as the
    Gateway API asks; sent only then)."""
    weight: Annotated[int, Field(ge=0, le=1_000_000)] = 1


class AgentTunnel(FromControl):
    domain: DomainName
    target: TargetAddress
    enabled: bool = True
    protocol: TunnelProtocol | None = None
    """None: HTTP (left out of the message, as every field below at its default)."""
    port: Port | None = None
    """The public port (TCP, UDP): how the gateways name a UDP tunnel's datagrams."""
    proxy_protocol: ProxyProtocol | None = None
    """V1, V2: the agent begins each connection to the target (each datagram, UDP) with a
    PROXY header carrying the client's address, as the gateway passed it on."""
    backend: BackendName | None = None
    """A route backend (of ``backends``) whose ready endpoints this tunnel's connections go to
    instead of ``target`` (a TLSRoute's host, passed through; a TCPRoute's or UDPRoute's port);
    None: ``target``."""
    shares: Annotated[list[WeightedBackend], Field(min_length=2, max_length=16)] | None = None
    """Several route backends with their weights: each connection (each UDP flow) goes to one,
    chosen by weight; a share without ``stream`` is refused (its backendRef does not resolve).
    ``backend`` is then one of them that resolves: what an agent of an earlier release uses."""


class AgentBackend(FromControl):
    """A backend of routes (Ingress, HTTPRoute) served by a cluster agent: a Service port,
    reached at the addresses of its ready endpoints. Gateways open streams named ``name``."""

    name: BackendName
    endpoints: Annotated[list[TargetAddress], Field(max_length=1000)] = Field(default_factory=list)
    """``ip:port`` of every ready endpoint; connections are spread across them (none: 503)."""


class AgentConfig(FromControl):
    version: ConfigVersion
    heartbeat_seconds: HeartbeatSeconds = DEFAULT_HEARTBEAT_SECONDS
    agent: AgentSelf
    gateways: list[GatewayPeer] = Field(default_factory=list)
    tunnels: Annotated[list[AgentTunnel], EachOnItsOwn] = Field(default_factory=list)
    backends: Annotated[list[AgentBackend], EachOnItsOwn] | None = None
    """A cluster agent's route backends (None: none, and left out of the message)."""


class AgentConfigMessage(FromControl):
    type: Literal["config"] = "config"
    data: AgentConfig


# --- What control sends to a gateway -----------------------------------------------------------


class GatewaySelf(FromControl):
    id: UUID
    public_ip: PublicIPv4
    name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    index: Annotated[int, Field(ge=1, le=99)]
    """Gateway index g: its address toward the agent of 10.N.M.0/24 is 10.N.M.g."""
    wireguard_port: Port = 51820
    http_port: Port = 80
    https_port: Port = 443
    trusted_proxies: list[CidrRange] | None = None
    """Load balancers whose ``X-Forwarded-For`` the gateway appends to (None: none, and left
    out of the message)."""
    client_limits: ClientLimits | None = None
    """None: the defaults (and left out of the message)."""
    accept_proxy_protocol: bool | None = None
    """True: read a PROXY header from ``trusted_proxies`` (None: false, left out)."""
    wireguard_private_key: WireGuardKey | None = None
    """Sent only over TLS (or loopback with ``--trust-loopback``), to edges that do not already
    hold it."""


class AgentPeer(FromControl):
    """An agent as a gateway sees it: a WireGuard peer that dials in."""

    id: UUID
    virtual_ip: IPv4Text
    subnet: CidrText
    wireguard_public_key: WireGuardKey
    address: IPv4Text
    """This gateway's own address inside the agent's subnet (10.N.M.g)."""


# --- Per-request routing (rules of Ingresses and HTTPRoutes) -------------------------------------

HeaderName = Annotated[
    str, Field(min_length=1, max_length=256, pattern=r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$")
]
HeaderValue = Annotated[str, Field(max_length=4096, pattern=r"^[\t\x20-\x7e\x80-\U0010ffff]*$")]
"""No CR, LF or NUL: a value never ends a line of the request head."""
PathValue = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        # (percent-escapes well formed, and never an encoded slash or backslash: a request
        # path with one is refused on such hosts, so a rule with one could never fit)
        pattern=r"^/(?:[-A-Za-z0-9._~!$&'()*+,;=:@/]|%(?:[013-46-9A-Fa-f][0-9A-Fa-f]|2[0-9A-Ea-e]|5[0-9ABabD-Fd-f]))*$",
    ),
]


class PathMatch(FromControl):
    type: Literal["Exact", "PathPrefix"] = "PathPrefix"
    """PathPrefix: by whole segments (``/api`` matches ``/api`` and ``/api/x``, not ``/apix``)."""
    value: PathValue = "/"


class HeaderMatch(FromControl):
    name: HeaderName
    value: HeaderValue
    """Exact, case-sensitive; the name is not."""


class QueryMatch(FromControl):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(max_length=1024)]
    """Exact, after percent-decoding both."""


class RequestMatch(FromControl):
    """All of its parts must fit (none: every request does)."""

    path: PathMatch | None = None
    method: Annotated[str, Field(max_length=32, pattern=r"^[A-Z]+$")] | None = None
    headers: Annotated[list[HeaderMatch], Field(max_length=16)] | None = None
    query: Annotated[list[QueryMatch], Field(max_length=16)] | None = None


class HeaderPair(FromControl):
    name: HeaderName
    value: HeaderValue


class HeaderEdits(FromControl):
    """Request header modifiers, applied in this order: remove, set (replaces), add."""

    set: Annotated[list[HeaderPair], Field(max_length=16)] | None = None
    add: Annotated[list[HeaderPair], Field(max_length=16)] | None = None
    remove: Annotated[list[HeaderName], Field(max_length=16)] | None = None


class RequestRule(FromControl):
    matches: Annotated[list[RequestMatch], Field(max_length=64)] | None = None
    """One of them must fit (none: every request fits)."""
    backends: Annotated[list[WeightedBackend], Field(max_length=16)] = Field(default_factory=list)
    """Chosen per request in proportion to their weights; none (or all weights 0): 500."""
    request_headers: HeaderEdits | None = None


class GatewayTunnel(FromControl):
    domain: DomainName
    agent_virtual_ip: IPv4Text | None = None
    """None: the domain's holder has no provisioned Agent now; the gateway answers 503 (it
    never routes the domain elsewhere)."""
    target: TargetAddress
    enabled: bool = True
    app_protocol: AppProtocol | None = None
    """None: HTTP1 (then left out of the message: gateways of releases before it refuse
    fields they do not know)."""
    hsts: Hsts | None = None
    protocol: TunnelProtocol | None = None
    """None: HTTP. TLS: passed through by SNI on the HTTPS port. TCP, UDP: on ``port``."""
    port: Port | None = None
    proxy_protocol: ProxyProtocol | None = None
    """Set (V1, V2): the agent writes a PROXY header, so streams carry the client's address."""
    rules: Annotated[list[RequestRule], Field(max_length=1000)] | None = None
    """Per-request routing (HTTP, from Ingress and HTTPRoute rules), in order of precedence:
    the first rule one of whose matches fits a request chooses its backend. None: every
    request goes to the stream named by the domain, as for a Tunnel."""


class CertificateBundle(FromControl):
    domain: DomainName
    certificate: str
    """Full chain, PEM."""
    private_key: str
    """PEM; sent only over TLS (or loopback with ``--trust-loopback``)."""


class AcmeChallenge(FromControl):
    """A pending HTTP-01 challenge: serve ``key_authorization`` at
    ``/.well-known/acme-challenge/<token>`` to requests for ``domain`` (their Host), and to
    no other."""

    domain: DomainName
    token: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_-]+$")]
    key_authorization: Annotated[str, Field(min_length=1, max_length=512)]


class GatewayConfig(FromControl):
    version: ConfigVersion
    heartbeat_seconds: HeartbeatSeconds = DEFAULT_HEARTBEAT_SECONDS
    gateway: GatewaySelf
    agents: list[AgentPeer] = Field(default_factory=list)
    tunnels: Annotated[list[GatewayTunnel], EachOnItsOwn] = Field(default_factory=list)
    certificates: Annotated[list[CertificateBundle], EachOnItsOwn] = Field(default_factory=list)
    acme_challenges: Annotated[list[AcmeChallenge], EachOnItsOwn] = Field(default_factory=list)


class GatewayConfigMessage(FromControl):
    type: Literal["config"] = "config"
    data: GatewayConfig


# --- Either role -------------------------------------------------------------------------------


class Identity(FromControl):
    """A node's own credentials, issued to an in-cluster gateway pod on first contact."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    api_key: ApiKey


class IdentityMessage(FromControl):
    type: Literal["identity"] = "identity"
    data: Identity


class ErrorMessage(FromControl):
    """Sent before control closes a connection for a reason the edge can act on."""

    type: Literal["error"] = "error"
    code: Annotated[str, Field(max_length=64)]
    message: Annotated[str, Field(max_length=4096)]


class ServerHeartbeat(FromControl):
    type: Literal["heartbeat"] = "heartbeat"
    sent_at: datetime | None = None


AgentInbound = Annotated[
    AgentConfigMessage | ErrorMessage | ServerHeartbeat, Field(discriminator="type")
]
GatewayInbound = Annotated[
    GatewayConfigMessage | IdentityMessage | ErrorMessage | ServerHeartbeat,
    Field(discriminator="type"),
]
agent_inbound: TypeAdapter[AgentInbound] = TypeAdapter(AgentInbound)
gateway_inbound: TypeAdapter[GatewayInbound] = TypeAdapter(GatewayInbound)


def encode(message: CamelModel) -> str:
    """One frame: JSON with camelCase names, unset optional values left out."""
    return message.model_dump_json(by_alias=True, exclude_none=True)


# --- Between a gateway and an agent, inside WireGuard ------------------------------------------

RELAY_PORT = 8471
"""The agent accepts the gateways' connections on its virtual IP at this port; their wire
format is in :mod:`kakuremichi.edge.mux`."""
