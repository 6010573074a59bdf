"""The agent's data path: streams from gateways (inside WireGuard) to the tunnels' targets.

Gateways connect to the agent's virtual IP and open streams over that connection
(:mod:`kakuremichi.edge.mux`), each naming its tunnel; the agent looks the tunnel up in its own
config and connects to that tunnel's target, and to nothing else: a name it does not serve gets
404, a target that refuses or does not answer gets 502 (a TCP or TLS Tunnel's client: a closed
connection). After that, bytes are spliced both ways with backpressure and half-closes passed
on; the gateway has already done the HTTP work. A Tunnel with ``proxyProtocol`` has each
connection to its target begin with a PROXY header carrying the client's address, which the
gateway named with the stream (:mod:`kakuremichi.edge.stream_names`).

Only the gateways of the agent's current config may connect: the listener is bound to the
WireGuard interface (Linux would otherwise take packets for the virtual IP from any interface:
a LAN neighbour, a pod on the same bridge), and a connection from any other address is refused
at once and counted (``kakuremichi_agent_errors_total{kind="relay_refused"}``). A gateway
dropped from the config loses its connections, and their streams, at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from kakuremichi.api.protocol import AgentBackend, AgentTunnel
from kakuremichi.api.resources import ProxyProtocol, TunnelProtocol
from kakuremichi.edge import proxy_header, stream_names
from kakuremichi.edge.mux import MuxConnection, MuxStream
from kakuremichi.edge.pages import error_response
from kakuremichi.edge.stats import EdgeStats
from kakuremichi.edge.stream_names import StreamName

TARGET_CONNECT_TIMEOUT = 5.0
RESOLVE_TTL_SECONDS = 30.0
ENDPOINT_ATTEMPTS = 3
"""A backend's endpoints tried in turn for one stream, while they refuse (a pod just gone)."""
RETIRED_QUIET_SECONDS = 1.0
"""A relay to an endpoint no longer listed is closed once quiet this long: a response in
flight finishes, a kept-alive connection goes (the gateway's next request gets another)..."""
RETIRED_LIMIT_SECONDS = 10.0
"""... and after this long whatever it carries (a busy kept-alive stream is never quiet)."""
log = logging.getLogger(__name__)


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class TargetResolver:
    """Target host names resolved off the loop and cached briefly (``localhost`` on every
    connection would otherwise cost a getaddrinfo in a thread)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, str]] = {}

    async def resolve(self, host: str) -> str:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        cached = self._cache.get(host)
        now = time.monotonic()
        if cached is not None and now - cached[0] < RESOLVE_TTL_SECONDS:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM, family=socket.AF_UNSPEC
        )
        address = str(infos[0][4][0])
        self._cache[host] = (now, address)
        return address


@dataclass(frozen=True)
class AgentTarget:
    """Where one of the agent's enabled tunnels goes, and how."""

    target: str
    protocol: TunnelProtocol = "HTTP"
    proxy_protocol: ProxyProtocol = "None"
    port: int | None = None
    """TCP, UDP: the public port."""
    endpoints: tuple[str, ...] | None = None
    """A route backend's ready endpoints (``ip:port``), connections spread across them; None:
    a Tunnel, which goes to ``target``. With ``shares``: every share's (what is still listed)."""
    shares: tuple[tuple[tuple[str, ...], int], ...] | None = None
    """Several weighted backends (a TLSRoute's, TCPRoute's, UDPRoute's): each connection goes
    to one, chosen by weight, then to its endpoints in turn; a share with none is refused."""

    @classmethod
    def of(
        cls, tunnel: AgentTunnel, backends: Mapping[str, AgentTarget] | None = None
    ) -> AgentTarget:
        """A tunnel's; one that names a route backend goes to that backend's endpoints (none
        while it is not in ``backends``)."""
        known = backends or {}

        def endpoints_of(name: str | None) -> tuple[str, ...]:
            found = known.get(name) if name is not None else None
            return found.endpoints if found is not None and found.endpoints else ()

        endpoints, shares = None, None
        if tunnel.shares:
            shares = tuple((endpoints_of(s.stream), s.weight) for s in tunnel.shares)
            endpoints = tuple(sorted({e for listed, _ in shares for e in listed}))
        elif tunnel.backend is not None:
            endpoints = endpoints_of(tunnel.backend)
        return cls(
            tunnel.target, tunnel.protocol or "HTTP", tunnel.proxy_protocol or "None", tunnel.port,
            endpoints, shares,
        )  # fmt: skip

    @classmethod
    def backend(cls, backend: AgentBackend) -> AgentTarget:
        return cls("", endpoints=tuple(backend.endpoints))


class AgentRelay:
    """Domain → target of this agent's enabled tunnels, and the open relays."""

    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats
        self.targets: dict[str, AgentTarget] = {}
        self.relays: set[GatewayConnection] = set()
        self.connections: set[GatewayLink] = set()
        self.gateways: frozenset[str] = frozenset()
        """The addresses gateways connect from (their WireGuard addresses in this agent's
        subnet): nobody else may."""
        self.resolver = TargetResolver()
        self.turns: dict[str, int] = {}
        """Per backend: where the next stream's turn through its endpoints starts."""

    def set_gateways(self, addresses: Iterable[str]) -> None:
        """Take connections from these addresses only; close those of any other."""
        self.gateways = frozenset(addresses)
        for connection in list(self.connections):
            if connection.peer not in self.gateways:
                log.info("closing the relay connection of %s: no longer a gateway", connection.peer)
                connection.close()

    def set_targets(self, targets: Mapping[str, AgentTarget]) -> None:
        """Serve ``targets``; relays of tunnels that were removed, disabled or now point
        elsewhere are closed, all others go on untouched. A backend's endpoints changing closes
        nothing at once: relays to an endpoint that left are retired (closed once quiet)."""
        before, self.targets = self.targets, dict(targets)
        changed = {d for d in before if not same_place(self.targets.get(d), before[d])}
        self.turns = {
            name: turn for name, turn in self.turns.items()
            if name.split("#", 1)[0] in self.targets
        }  # fmt: skip
        for relay in list(self.relays):
            if relay.domain in changed:
                relay.close()
            elif relay.endpoint:
                relay.check_listed()

    def listed(self, name: str, place: str) -> bool:
        """Whether ``place`` is (still) an endpoint of backend ``name``."""
        now = self.targets.get(name)
        return now is not None and place in (now.endpoints or ())

    def candidates(self, name: str, tunnel: AgentTarget) -> list[str]:
        """Where a new stream of ``name`` may connect, in the order to try."""
        return spread(tunnel, self.turns, name)[:ENDPOINT_ATTEMPTS]

    def sweep(self, now: float) -> None:
        """Close relays to endpoints that left, once they are quiet (or retired long enough)."""
        for relay in [r for r in self.relays if r.retired]:
            quiet = now - relay.last_active >= RETIRED_QUIET_SECONDS
            if quiet or now - relay.retired_at >= RETIRED_LIMIT_SECONDS:
                relay.close()

    def protocol(self) -> MuxConnection:
        """For each connection to the relay port."""
        return GatewayLink(self)

    def close_all(self) -> None:
        for relay in list(self.relays):
            relay.close()
        for connection in list(self.connections):
            connection.close()


def spread(tunnel: AgentTarget, turns: dict[str, int], name: str) -> list[str]:
    """Where a new connection (or UDP flow) of ``name`` goes, in the order to try: a Tunnel's
    target; a backend's endpoints, each one starting one further (round robin); with several
    weighted backends, one chosen by weight first (none: refused, as a share that does not
    resolve is)."""
    endpoints = tunnel.endpoints
    if endpoints is None:
        return [tunnel.target]
    key = name
    if tunnel.shares is not None:
        weights = [weight for _, weight in tunnel.shares]
        if not any(weights):
            return []
        (index,) = random.choices(range(len(tunnel.shares)), weights)  # noqa: S311 (spreading load)
        endpoints, key = tunnel.shares[index][0], f"{name}#{index}"
    if not endpoints:
        return []
    turn = turns.get(key, 0) % len(endpoints)
    turns[key] = turn + 1
    return [*endpoints[turn:], *endpoints[:turn]]


def same_place(now: AgentTarget | None, before: AgentTarget) -> bool:
    """Whether ``now`` goes where ``before`` did, endpoints aside (they are followed live)."""
    if now is None:
        return False
    if now.endpoints is not None and before.endpoints is not None:
        return _placeless(now) == _placeless(before)
    return now == before


def _placeless(target: AgentTarget) -> AgentTarget:
    shares = tuple(((), weight) for _, weight in target.shares or ()) or None
    return dataclasses.replace(target, endpoints=(), shares=shares)


class GatewayLink(MuxConnection):
    """A connection to the relay port: a gateway's, or refused."""

    def __init__(self, relay: AgentRelay) -> None:
        super().__init__(
            accept=lambda domain: GatewayConnection(relay, domain),
            on_lost=lambda connection: relay.connections.discard(cast(GatewayLink, connection)),
        )
        self.relay = relay
        self.peer = ""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        peer = base.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.peer not in self.relay.gateways:
            self.relay.stats.errors["relay_refused"] += 1
            log.warning(
                "refused a relay connection from %s: not a gateway of this agent", self.peer
            )
            self.is_lost = True
            cast(asyncio.Transport, base).abort()
            return
        self.relay.connections.add(self)
        super().connection_made(base)


class GatewayConnection(asyncio.Protocol):
    """One stream from a gateway: one tunnel's bytes, to and from one target connection."""

    def __init__(self, relay: AgentRelay, name: str) -> None:
        self.relay = relay
        self.stats = relay.stats
        try:
            self.name: StreamName | None = stream_names.decode(name)
        except stream_names.StreamNameError as error:
            log.warning("a stream from a gateway names %r: %s", name[:64], error)
            self.name = None
        self.domain = self.name.domain if self.name is not None else ""
        self.tunnel: AgentTarget | None = None
        self.transport: MuxStream | None = None
        self.target: TargetConnection | None = None
        self.client_done = self.target_done = False
        """Each side has half-closed (TCP, TLS): once both have, the relay is over."""
        self.endpoint = ""
        """The backend endpoint connected to (Tunnels: empty)."""
        self.retired = False
        """The endpoint left its backend: closed once quiet."""
        self.retired_at = 0.0
        self.last_active = 0.0
        """When bytes last passed (backends only: what retiring looks at)."""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(MuxStream, base)
        self.stats.connections_total += 1
        self.stats.active_connections += 1
        self.relay.relays.add(self)
        tunnel = self.tunnel = self.relay.targets.get(self.domain)
        if tunnel is None or tunnel.protocol == "UDP":
            self.stats.errors["unknown_tunnel"] += 1
            self.answer(404, f"No tunnel serves {self.domain} on this agent.")
            return
        self.stats.tunnel_connections[self.domain] += 1
        transport.pause_reading()  # until the target is connected: the stream holds the bytes
        asyncio.get_running_loop().create_task(self.connect(tunnel))

    def data_received(self, data: bytes) -> None:
        self.stats.received_bytes[self.domain] += len(data)
        if self.endpoint:
            self.last_active = time.monotonic()
        if self.target is not None and self.target.transport is not None:
            self.target.transport.write(data)

    async def connect(self, tunnel: AgentTarget) -> None:
        candidates = self.relay.candidates(self.domain, tunnel)
        if not candidates:
            self.stats.errors["no_endpoint"] += 1
            self.answer(503, f"No endpoint of {self.domain} is ready.")
            return
        connection = None
        for place in candidates:
            if tunnel.endpoints is not None and not self.relay.listed(self.domain, place):
                continue  # (it left while an earlier one was tried)
            try:
                connection = await self._connect_to(place)
                break
            except TimeoutError:
                log.info("target %s of %s unreachable: timeout", place, self.domain)
                break  # (another try would keep the client waiting as long again)
            except OSError as error:
                log.info("target %s of %s unreachable: %s", place, self.domain, error)
        if connection is None:
            self.stats.errors["target_unreachable"] += 1
            self.answer(502, f"The service behind {self.domain} is not answering.")
            return
        if self.transport is None or self.transport.is_closing():
            connection.close()
            return
        self.target = connection
        if tunnel.endpoints is not None:
            self.endpoint, self.last_active = place, time.monotonic()
            self.check_listed()  # (it may have left while connecting)
        if tunnel.proxy_protocol != "None" and connection.transport is not None:
            name = self.name
            connection.transport.write(
                proxy_header.encode(
                    tunnel.proxy_protocol,
                    name.client if name is not None else None,
                    name.gateway if name is not None else None,
                )
            )
        self.transport.resume_reading()

    def check_listed(self) -> None:
        """Retire this relay if its endpoint is no longer one of its backend's."""
        if not self.retired and not self.relay.listed(self.domain, self.endpoint):
            self.retired, self.retired_at = True, time.monotonic()

    async def _connect_to(self, place: str) -> TargetConnection:
        host, port = split_target(place)
        connection = TargetConnection(self)
        async with asyncio.timeout(TARGET_CONNECT_TIMEOUT):
            address = await self.relay.resolver.resolve(host)
            await asyncio.get_running_loop().create_connection(lambda: connection, address, port)
        return connection

    def answer(self, code: int, detail: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.tunnel is None or self.tunnel.protocol == "HTTP":
            self.transport.write(error_response(code, detail))
        self.transport.close()  # (a TCP or TLS client: just closed)

    def eof_received(self) -> bool | None:
        tunnel, target = self.tunnel, self.target
        if tunnel is None or tunnel.protocol == "HTTP" or target is None:
            return None  # HTTP streams are not half-closed: a closed upstream is done
        self.client_done = True
        if self.target_done:
            target.close()
            return None
        if target.transport is not None and not target.transport.is_closing():
            target.transport.write_eof()  # the client is done sending; the answer may follow
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.relays.discard(self)
        self.stats.active_connections -= 1
        if self.target is not None:
            self.target.close()

    def pause_writing(self) -> None:
        if self.target is not None and self.target.transport is not None:
            self.target.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None and self.target.transport is not None:
            self.target.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TargetConnection(asyncio.Protocol):
    def __init__(self, gateway: GatewayConnection) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        gateway = self.gateway
        if gateway.endpoint:
            gateway.last_active = time.monotonic()
        if gateway.transport is not None:
            gateway.transport.write(data)
            gateway.stats.sent_bytes[gateway.domain] += len(data)

    def eof_received(self) -> bool | None:
        gateway = self.gateway
        transport = gateway.transport
        gateway.target_done = True
        if gateway.client_done:
            gateway.close()
            return None
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.close()

    def pause_writing(self) -> None:
        if self.gateway.transport is not None:
            self.gateway.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.gateway.transport is not None:
            self.gateway.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
