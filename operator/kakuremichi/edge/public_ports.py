"""A gateway's TCP and UDP Tunnels: a public port each, forwarded to the Tunnel's agent.

- **TCP**: each connection becomes a stream over the gateway's connection to the agent (the
  same multiplexed connection HTTPS uses), spliced byte for byte (:mod:`kakuremichi.edge.splice`),
  under the same per-address and total connection caps as HTTPS (counted apart).
- **UDP**: each client address and port is a flow; its datagrams go to the agent one by one,
  framed (:mod:`kakuremichi.edge.udp_frames`), from the gateway's UDP relay socket inside
  WireGuard, without a TCP hop; the agent's answers come back the same way and leave from the
  Tunnel's port to the flow's client. A flow idle for ``udpIdleTimeoutSeconds`` is forgotten; a
  Tunnel has at most ``maxUdpFlows``; an answer is sent only for a flow this gateway opened
  toward that agent (no agent can make the gateway send to anyone else), and datagrams too large
  for one WireGuard packet are dropped. Every drop is counted, by Tunnel and reason.

A port that cannot be bound (another program has it) is reported to control (``PortUnavailable``)
and tried again every :data:`RETRY_SECONDS`, without holding up the rest of the config.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.api.resources import ClientLimits, PortProtocol
from kakuremichi.edge import udp_frames
from kakuremichi.edge.connection_caps import ConnectionCaps, address_key
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.proxy_gate import ProxySettings
from kakuremichi.edge.proxy_header import Address
from kakuremichi.edge.request_heads import parse_networks, trusted
from kakuremichi.edge.splice import ClientLink, Splices
from kakuremichi.edge.stats import EdgeStats

RETRY_SECONDS = 10.0
log = logging.getLogger(__name__)
PortKey = tuple[PortProtocol, int]


ANSWERS_PER_DATAGRAM = 64
"""A flow carries at most this many answers per datagram of its client, and at most
``udpAnswerBytes`` (or 8 times the datagram) of them: an agent cannot make the gateway flood a
client (perhaps a forged address) that no longer speaks."""


@dataclass(eq=False)
class UdpFlow:
    client: Address
    agent_ip: str
    key: bytes
    """Its client's, in the per-address count (IPv6: the /64)."""
    last_active: float = field(default_factory=time.monotonic)
    """When its client last sent (answers do not keep a flow)."""
    answers_left: int = ANSWERS_PER_DATAGRAM
    answer_bytes_left: int = 0


class UdpPort(asyncio.DatagramProtocol):
    """A UDP Tunnel's public socket and its flows."""

    def __init__(self, ports: PublicPorts, route: GatewayRoute) -> None:
        self.ports = ports
        self.route = route
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: OrderedDict[Address, UdpFlow] = OrderedDict()
        """Least recently heard from first: when the table is full, the first goes."""
        self.by_address: dict[bytes, int] = {}
        """Flows per client address (IPv6: per /64)."""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, base)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        route, stats = self.route, self.ports.stats
        client = (_host(addr), int(addr[1]))
        if route.agent_ip is None or not route.enabled:
            stats.drop(route.domain, "no_agent")
            return
        if len(data) > udp_frames.max_datagram(client[0]):
            stats.drop(route.domain, "too_large")
            return
        flow = self.flows.get(client)
        if flow is None:
            flow = self._open_flow(client, route.agent_ip)
            if flow is None:
                return
        else:
            self.flows.move_to_end(client)
        flow.last_active = time.monotonic()
        flow.answers_left = ANSWERS_PER_DATAGRAM
        flow.answer_bytes_left = max(self.ports.limits.udp_answer_bytes, 8 * len(data))
        stats.datagrams_in[route.domain] += 1
        stats.received_bytes[route.domain] += len(data)
        assert route.port is not None
        self.ports.link.send(route.agent_ip, udp_frames.encode(route.port, client, data))

    def answer(self, agent_ip: str, client: Address, data: memoryview) -> None:
        """An answer of the agent for ``client``: sent only on a flow toward that agent."""
        route, stats = self.route, self.ports.stats
        flow = self.flows.get(client)
        if flow is None or flow.agent_ip != agent_ip or self.transport is None:
            stats.drop(route.domain, "no_flow")
            return
        if flow.answers_left <= 0 or flow.answer_bytes_left < len(data):
            stats.drop(route.domain, "answer_budget")
            return
        flow.answers_left -= 1
        flow.answer_bytes_left -= len(data)
        stats.datagrams_out[route.domain] += 1
        stats.sent_bytes[route.domain] += len(data)
        self.transport.sendto(data, client)

    def error_received(self, exc: Exception) -> None:
        self.ports.stats.errors["udp_send"] += 1

    def _open_flow(self, client: Address, agent_ip: str) -> UdpFlow | None:
        limits, stats, domain = self.ports.limits, self.ports.stats, self.route.domain
        address = client[0].encode()
        key = address_key(address)
        if self.by_address.get(key, 0) >= limits.max_udp_flows_per_address and not trusted(
            address, self.ports.caps.exempt
        ):
            stats.drop(domain, "flow_cap_per_address")
            return None
        if len(self.flows) >= limits.max_udp_flows:
            # Full (perhaps of forged sources): the flow heard from least recently goes, so a
            # new client is never locked out; it is counted.
            self.forget(next(iter(self.flows)))
            stats.drop(domain, "flow_evicted")
        self.by_address[key] = self.by_address.get(key, 0) + 1
        flow = self.flows[client] = UdpFlow(client, agent_ip, key)
        return flow

    def forget(self, client: Address) -> None:
        flow = self.flows.pop(client, None)
        if flow is None:
            return
        left = self.by_address.get(flow.key, 1) - 1
        if left > 0:
            self.by_address[flow.key] = left
        else:
            self.by_address.pop(flow.key, None)

    def forget_all(self) -> None:
        self.flows.clear()
        self.by_address.clear()

    def sweep(self, now: float) -> None:
        """Forget the flows idle too long: the oldest are first, so this stops at the first
        one that is not."""
        limit = now - self.ports.limits.udp_idle_timeout_seconds
        while self.flows:
            client, flow = next(iter(self.flows.items()))
            if flow.last_active >= limit:
                break
            self.forget(client)

    def close(self) -> None:
        self.forget_all()
        if self.transport is not None:
            self.transport.close()


class UdpLink(asyncio.DatagramProtocol):
    """The gateway's UDP relay socket inside WireGuard: frames to agents, and their answers."""

    def __init__(self, ports: PublicPorts) -> None:
        self.ports = ports
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, base)

    def send(self, agent_ip: str, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(frame, (agent_ip, self.ports.relay_port))

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        stats = self.ports.stats
        try:
            port, client, payload = udp_frames.decode(data)
        except udp_frames.FrameError:
            stats.errors["udp_frame"] += 1
            return
        target = self.ports.udp.get(port)
        if target is None or int(addr[1]) != self.ports.relay_port:
            stats.errors["udp_frame"] += 1
            return
        target.answer(_host(addr), client, payload)

    def error_received(self, exc: Exception) -> None:
        self.ports.stats.errors["udp_relay"] += 1


class PublicPorts:
    """The gateway process's TCP and UDP Tunnels' ports."""

    def __init__(
        self,
        stats: EdgeStats,
        splices: Splices,
        proxy: ProxySettings,
        listen_address: str | None,
        relay_device: str | None,
        relay_port: int = RELAY_PORT,
    ) -> None:
        self.stats = stats
        self.splices = splices
        self.proxy = proxy
        self.listen_address = listen_address
        self.relay_device = relay_device
        """The gateway's WireGuard interface: the UDP relay socket takes only what arrives
        there (None: any interface, for tests without one)."""
        self.relay_port = relay_port
        self.caps = ConnectionCaps(stats)
        """TCP Tunnels' connections, counted apart from the HTTPS port's."""
        self.limits = ClientLimits()
        self.routes: dict[PortKey, GatewayRoute] = {}
        self.tcp: dict[int, asyncio.Server] = {}
        self.udp: dict[int, UdpPort] = {}
        self.link = UdpLink(self)
        self.link_transport: asyncio.DatagramTransport | None = None
        self.unavailable: dict[PortKey, str] = {}
        """Ports of the config that could not be bound: (protocol, port) → why."""
        self.link_error: str | None = None
        """Why the UDP relay socket could not be opened (its UDP Tunnels are unavailable)."""
        self.lock = asyncio.Lock()
        """A config's apply and the retries of ports never interleave (a retry's bind of a
        port a config just dropped would outlive it)."""

    async def apply(
        self, routes: Iterable[GatewayRoute], limits: ClientLimits | None,
        trusted_proxies: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """Listen on exactly the enabled TCP and UDP routes' ports (a route without an agent
        keeps its port: its clients are closed, its datagrams dropped); connections and flows
        of a route that changed are closed."""
        async with self.lock:
            await self._apply(routes, limits, trusted_proxies)

    async def _apply(
        self, routes: Iterable[GatewayRoute], limits: ClientLimits | None,
        trusted_proxies: Sequence[str],
    ) -> None:  # fmt: skip
        self.limits = self.caps.limits = limits or ClientLimits()
        self.caps.exempt = parse_networks(trusted_proxies)
        wanted: dict[PortKey, GatewayRoute] = {}
        for route in routes:
            if route.protocol in ("TCP", "UDP") and route.port is not None and route.enabled:
                wanted["TCP" if route.protocol == "TCP" else "UDP", route.port] = route
        before, self.routes = self.routes, wanted
        self.splices.idle_timeout = self.limits.tcp_idle_timeout_seconds
        self.splices.close_where(
            lambda link: (
                link.route.protocol == "TCP"
                and self.routes.get(("TCP", link.route.port or 0)) != link.route
            )
        )
        for key in set(before) - set(wanted):
            self._close(key)
        for key, route in wanted.items():
            udp = self.udp.get(key[1]) if key[0] == "UDP" else None
            if udp is not None and udp.route != route:
                udp.forget_all()
                udp.route = route
        self.link_error = None
        if any(key[0] == "UDP" for key in wanted):
            try:
                await self._open_link()
            except OSError as error:
                # Never a relay socket open to more than WireGuard: no UDP Tunnels instead.
                self.link_error = error.strerror or str(error)
                log.error("cannot open the UDP relay socket on %s: %s; UDP Tunnels are not "
                          "served", self.relay_device, self.link_error)  # fmt: skip
        await self._bind_missing()

    async def bind_missing(self) -> bool:
        """Bind the ports not bound yet; whether what is unavailable changed."""
        async with self.lock:
            return await self._bind_missing()

    async def _bind_missing(self) -> bool:
        before = dict(self.unavailable)
        self.unavailable = {}
        for key, route in self.routes.items():
            protocol, port = key
            if (protocol == "TCP" and port in self.tcp) or (protocol == "UDP" and port in self.udp):
                continue
            if protocol == "UDP" and self.link_error is not None:
                self.unavailable[key] = f"no UDP relay socket: {self.link_error}"[:200]
                continue
            try:
                if protocol == "TCP":
                    self.tcp[port] = await self._serve_tcp(port)
                else:
                    self.udp[port] = await self._serve_udp(route)
                log.info("%s tunnel %s on port %d", protocol, route.domain, port)
            except OSError as error:
                reason = error.strerror or str(error)
                self.unavailable[key] = reason[:200]
                if before.get(key) != self.unavailable[key]:
                    log.warning("cannot listen on %d/%s for %s: %s", port, protocol,
                                route.domain, reason)  # fmt: skip
        return before != self.unavailable

    async def retry_forever(self, changed: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if self.unavailable and await self.bind_missing():
                changed()

    def sweep(self, now: float) -> None:
        for port in self.udp.values():
            port.sweep(now)

    def close_all(self) -> None:
        for key in list(self.routes):
            self._close(key)
        self.routes = {}
        if self.link_transport is not None:
            self.link_transport.close()
            self.link_transport = None

    # --- internals ---------------------------------------------------------------------------

    async def _serve_tcp(self, port: int) -> asyncio.Server:
        def connection() -> asyncio.Protocol:
            route = self.routes.get(("TCP", port))
            if route is None:  # (the port is being closed)
                return _Refused()
            return self.proxy.factory(
                lambda client: ClientLink(self.splices, route, self.caps, None, client,
                                          screen=self.proxy.enabled and client is None),
                self.stats,
            )()  # fmt: skip

        return await asyncio.get_running_loop().create_server(
            connection, self.listen_address, port, backlog=4096, reuse_address=True
        )

    async def _serve_udp(self, route: GatewayRoute) -> UdpPort:
        assert route.port is not None
        protocol = UdpPort(self, route)
        await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: protocol,
            local_addr=(self.listen_address or "0.0.0.0", route.port),  # noqa: S104 - public
        )
        return protocol

    async def _open_link(self) -> None:
        if self.link_transport is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.relay_device is not None:  # only what comes over WireGuard
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.relay_device.encode()
                )
            sock.bind(("0.0.0.0", self.relay_port))  # noqa: S104 - on the device alone
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: self.link, sock=sock
        )
        self.link_transport = transport

    def _close(self, key: PortKey) -> None:
        protocol, port = key
        self.unavailable.pop(key, None)
        if protocol == "TCP":
            server = self.tcp.pop(port, None)
            if server is not None:
                server.close()
        else:
            udp = self.udp.pop(port, None)
            if udp is not None:
                udp.close()


class _Refused(asyncio.Protocol):
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, base).abort()


def _host(addr: tuple[str | int, ...]) -> str:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host
