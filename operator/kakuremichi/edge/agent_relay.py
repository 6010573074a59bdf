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
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from kakuremichi.api.protocol import AgentTunnel
from kakuremichi.api.resources import ProxyProtocol, TunnelProtocol
from kakuremichi.edge import proxy_header, stream_names
from kakuremichi.edge.mux import MuxConnection, MuxStream
from kakuremichi.edge.pages import error_response
from kakuremichi.edge.stats import EdgeStats
from kakuremichi.edge.stream_names import StreamName

TARGET_CONNECT_TIMEOUT = 5.0
RESOLVE_TTL_SECONDS = 30.0
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

    @classmethod
    def of(cls, tunnel: AgentTunnel) -> AgentTarget:
        return cls(
            tunnel.target, tunnel.protocol or "HTTP", tunnel.proxy_protocol or "None", tunnel.port
        )


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

    def set_gateways(self, addresses: Iterable[str]) -> None:
        """Take connections from these addresses only; close those of any other."""
        self.gateways = frozenset(addresses)
        for connection in list(self.connections):
            if connection.peer not in self.gateways:
                log.info("closing the relay connection of %s: no longer a gateway", connection.peer)
                connection.close()

    def set_targets(self, targets: Mapping[str, AgentTarget]) -> None:
        """Serve ``targets``; relays of tunnels that were removed, disabled or now point
        elsewhere are closed, all others go on untouched."""
        before, self.targets = self.targets, dict(targets)
        changed = {d for d in before if self.targets.get(d) != before[d]}
        for relay in list(self.relays):
            if relay.domain in changed:
                relay.close()

    def protocol(self) -> MuxConnection:
        """For each connection to the relay port."""
        return GatewayLink(self)

    def close_all(self) -> None:
        for relay in list(self.relays):
            relay.close()
        for connection in list(self.connections):
            connection.close()


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
        if self.target is not None and self.target.transport is not None:
            self.target.transport.write(data)

    async def connect(self, tunnel: AgentTarget) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_target(tunnel.target)
        connection = TargetConnection(self)
        try:
            async with asyncio.timeout(TARGET_CONNECT_TIMEOUT):
                address = await self.relay.resolver.resolve(host)
                await loop.create_connection(lambda: connection, address, port)
        except (OSError, TimeoutError) as error:
            log.info("target %s of %s unreachable: %s", tunnel.target, self.domain,
                     error or "timeout")  # fmt: skip
            self.stats.errors["target_unreachable"] += 1
            self.answer(502, f"The service behind {self.domain} is not answering.")
            return
        if self.transport is None or self.transport.is_closing():
            connection.close()
            return
        self.target = connection
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
