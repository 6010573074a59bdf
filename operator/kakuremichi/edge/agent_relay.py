"""The agent's data path: streams from gateways (inside WireGuard) to the tunnels' targets.

Gateways connect to the agent's virtual IP and open streams over that connection
(:mod:`kakuremichi.edge.mux`), each naming its tunnel; the agent looks the tunnel up in its own
config and connects to that tunnel's target, and to nothing else: a name it does not serve gets
404, a target that refuses or does not answer gets 502. After that, bytes are spliced both ways
with backpressure and half-closes passed on; the gateway has already done the HTTP work.

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
from typing import cast

from kakuremichi.edge.mux import MuxConnection, MuxStream
from kakuremichi.edge.pages import error_response
from kakuremichi.edge.stats import EdgeStats

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


class AgentRelay:
    """Domain → target of this agent's enabled tunnels, and the open relays."""

    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats
        self.targets: dict[str, str] = {}
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

    def set_targets(self, targets: Mapping[str, str]) -> None:
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

    def __init__(self, relay: AgentRelay, domain: str) -> None:
        self.relay = relay
        self.stats = relay.stats
        self.domain = domain
        self.transport: MuxStream | None = None
        self.target: TargetConnection | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(MuxStream, base)
        self.stats.connections_total += 1
        self.stats.active_connections += 1
        self.relay.relays.add(self)
        target = self.relay.targets.get(self.domain)
        if target is None:
            self.stats.errors["unknown_tunnel"] += 1
            self.answer(404, f"No tunnel serves {self.domain} on this agent.")
            return
        transport.pause_reading()  # until the target is connected: the stream holds the bytes
        asyncio.get_running_loop().create_task(self.connect(target))

    def data_received(self, data: bytes) -> None:
        self.stats.received_bytes[self.domain] += len(data)
        if self.target is not None and self.target.transport is not None:
            self.target.transport.write(data)

    async def connect(self, target: str) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_target(target)
        connection = TargetConnection(self)
        try:
            async with asyncio.timeout(TARGET_CONNECT_TIMEOUT):
                address = await self.relay.resolver.resolve(host)
                await loop.create_connection(lambda: connection, address, port)
        except (OSError, TimeoutError) as error:
            log.info("target %s of %s unreachable: %s", target, self.domain, error or "timeout")
            self.stats.errors["target_unreachable"] += 1
            self.answer(502, f"The service behind {self.domain} is not answering.")
            return
        if self.transport is None or self.transport.is_closing():
            connection.close()
            return
        self.target = connection
        self.transport.resume_reading()

    def answer(self, code: int, detail: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(error_response(code, detail))
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # gateways never half-close: a closed upstream is done with the target

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
        transport = self.gateway.transport
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
