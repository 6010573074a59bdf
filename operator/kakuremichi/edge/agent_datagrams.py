"""The agent's side of UDP Tunnels: framed datagrams from gateways (inside WireGuard, on the
relay port) to the Tunnel's target, and the target's answers back.

Each (gateway, Tunnel, client address and port) is a flow with a socket of its own toward the
target, so the target sees each client as a distinct peer and its answers find their client.
Frames are taken only from the gateways of the agent's config (else dropped and counted,
``relay_refused``); a Tunnel has at most :data:`MAX_FLOWS_PER_TUNNEL` flows, and all together
at most :data:`MAX_FLOWS` (when full, the Tunnel with the most loses its oldest), each forgotten
after :data:`FLOW_IDLE_SECONDS` without a datagram either way; a Tunnel with ``proxyProtocol:
V2`` has each datagram to the target begin with a PROXY v2 header (the client's address, and the
gateway's public address and the Tunnel's port), as HAProxy's specification has it for UDP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.edge import proxy_header, udp_frames
from kakuremichi.edge.agent_relay import (
    AgentTarget,
    TargetResolver,
    same_place,
    split_target,
    spread,
)
from kakuremichi.edge.proxy_header import Address
from kakuremichi.edge.stats import EdgeStats

FLOW_IDLE_SECONDS = 120.0
"""Longer than a gateway's default (60 s): the gateway forgets a flow first."""
MAX_FLOWS_PER_TUNNEL = 4096
MAX_FLOWS = 32768
"""Of every Tunnel together (each is a socket): an agent serving many ports (the cluster agent,
every tenant's UDPRoutes) stays within its files and memory whatever its ports are sent."""
MAX_WAITING = 16
"""Datagrams of a new flow held while its socket to the target is being made."""
log = logging.getLogger(__name__)
FlowKey = tuple[str, int, Address]
"""(gateway address, Tunnel port, client)"""


@dataclass(frozen=True)
class UdpTunnel:
    domain: str
    target: AgentTarget


class AgentDatagrams(asyncio.DatagramProtocol):
    def __init__(
        self, stats: EdgeStats, resolver: TargetResolver | None = None,
        relay_port: int = RELAY_PORT,
    ) -> None:  # fmt: skip
        self.stats = stats
        self.relay_port = relay_port
        self.resolver = resolver or TargetResolver()
        self.transport: asyncio.DatagramTransport | None = None
        self.gateways: dict[str, str] = {}
        """Gateway address inside WireGuard → its public address (the PROXY header's
        destination)."""
        self.tunnels: dict[int, UdpTunnel] = {}
        """UDP Tunnels by public port."""
        self.flows: dict[FlowKey, TargetFlow] = {}
        self.by_port: dict[int, dict[FlowKey, None]] = {}
        """Each Tunnel port's flows, oldest first."""
        self.turns: dict[str, int] = {}
        """Per route backend (by domain): where the next flow's turn through its endpoints is."""
        self.listening_on: str | None = None

    # --- configuration ---------------------------------------------------------------------

    def set_gateways(self, gateways: Mapping[str, str]) -> None:
        self.gateways = dict(gateways)
        for key in [k for k in self.flows if k[0] not in self.gateways]:
            self.forget(key)

    def set_tunnels(self, tunnels: Mapping[str, AgentTarget]) -> None:
        """The enabled UDP Tunnels; flows of one that changed or went are closed."""
        wanted = {
            t.port: UdpTunnel(domain, t)
            for domain, t in tunnels.items()
            if t.protocol == "UDP" and t.port is not None
        }
        before, self.tunnels = self.tunnels, wanted
        changed = {port for port, tunnel in before.items() if not _same(wanted.get(port), tunnel)}
        domains = {tunnel.domain for tunnel in wanted.values()}
        self.turns = {k: turn for k, turn in self.turns.items() if k.split("#", 1)[0] in domains}
        listed = {
            port: frozenset(tunnel.target.endpoints or ()) for port, tunnel in wanted.items()
        }  # fmt: skip
        for key, flow in list(self.flows.items()):
            if key[1] in changed or (
                flow.endpoint is not None and flow.endpoint not in listed.get(key[1], ())
            ):
                self.forget(key)  # (an endpoint that left its backend: its flows end with it)

    def endpoint_for(self, tunnel: UdpTunnel, port: int) -> str | None:
        """Where a new flow goes: a Tunnel's target; a backend's endpoints in turn (None:
        it has none ready)."""
        places = spread(tunnel.target, self.turns, tunnel.domain)
        return places[0] if places else None

    async def listen(self, address: str, device: str | None) -> None:
        """The relay socket on the virtual IP (bound to the WireGuard interface, when given)."""
        if self.transport is not None and self.listening_on == address:
            return
        self.close_socket()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if device is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            sock.bind((address, self.relay_port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        self.listening_on = address

    def close_socket(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.listening_on = None

    def close_all(self) -> None:
        for key in list(self.flows):
            self.forget(key)
        self.close_socket()

    def sweep(self, now: float) -> None:
        limit = now - FLOW_IDLE_SECONDS
        for key in [k for k, f in self.flows.items() if f.last_active < limit]:
            self.forget(key)

    def forget(self, key: FlowKey) -> None:
        flow = self.flows.pop(key, None)
        if flow is None:
            return
        flow.close()
        of_port = self.by_port.get(key[1])
        if of_port is not None:
            of_port.pop(key, None)
            if not of_port:
                del self.by_port[key[1]]

    # --- from gateways -----------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, base)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        gateway = str(addr[0])
        if gateway not in self.gateways or int(addr[1]) != self.relay_port:
            self.stats.errors["relay_refused"] += 1
            return
        try:
            port, client, payload = udp_frames.decode(data)
        except udp_frames.FrameError:
            self.stats.errors["udp_frame"] += 1
            return
        tunnel = self.tunnels.get(port)
        if tunnel is None:
            self.stats.errors["unknown_tunnel"] += 1
            return
        key = (gateway, port, client)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.by_port.get(port, ())) >= MAX_FLOWS_PER_TUNNEL:
                self.stats.drop(tunnel.domain, "flow_cap")
                return
            endpoint = self.endpoint_for(tunnel, port)
            if endpoint is None:
                self.stats.drop(tunnel.domain, "no_endpoint")
                return
            if len(self.flows) >= MAX_FLOWS:
                self.make_room()
            flow = self.flows[key] = TargetFlow(self, key, tunnel, endpoint)
            self.by_port.setdefault(port, {})[key] = None
            flow.opening = asyncio.get_running_loop().create_task(flow.open())
        if tunnel.target.proxy_protocol == "V2":
            public = (self.gateways[gateway], port)
            head = proxy_header.encode("V2", client, public, datagram=True)
            flow.send(head + bytes(payload))
        else:
            flow.send(bytes(payload))

    def make_room(self) -> None:
        """Room for a new flow in a full table: the oldest flow of the Tunnel with the most
        goes (one that floods a port of its own, or has one flooded, crowds out only itself
        once it has the most: every other Tunnel keeps its flows); counted on that Tunnel."""
        biggest = max(self.by_port, key=lambda port: len(self.by_port[port]))
        evicted = next(iter(self.by_port[biggest]))
        self.stats.drop(self.flows[evicted].tunnel.domain, "flow_evicted")
        self.forget(evicted)

    def error_received(self, exc: Exception) -> None:
        self.stats.errors["udp_relay"] += 1

    def answer(self, flow: TargetFlow, data: bytes) -> None:
        gateway, port, client = flow.key
        domain = flow.tunnel.domain
        if len(data) > udp_frames.max_datagram(client[0]):
            self.stats.drop(domain, "too_large")
            return
        if self.transport is None:
            self.stats.drop(domain, "no_relay")
            return
        self.stats.datagrams_out[domain] += 1
        self.stats.sent_bytes[domain] += len(data)
        self.transport.sendto(udp_frames.encode(port, client, data), (gateway, self.relay_port))


class TargetFlow(asyncio.DatagramProtocol):
    """One client's datagrams to the target, over a socket of its own."""

    def __init__(
        self, relay: AgentDatagrams, key: FlowKey, tunnel: UdpTunnel, place: str | None = None
    ) -> None:
        self.relay = relay
        self.key = key
        self.tunnel = tunnel
        self.place = place or tunnel.target.target
        """``host:port`` its datagrams go to."""
        self.endpoint = place if tunnel.target.endpoints is not None else None
        """The route backend's endpoint it goes to (None: a Tunnel's target)."""
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[bytes] = []
        self.opening: asyncio.Task[None] | None = None
        """Making the socket (held: the loop keeps only weak references to tasks)."""
        self.closed = False
        self.last_active = time.monotonic()

    async def open(self) -> None:
        host, port = split_target(self.place)
        try:
            address = await self.relay.resolver.resolve(host)
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: self, remote_addr=(address, port)
            )
        except OSError as error:
            log.info("UDP target %s of %s: %s", self.place, self.tunnel.domain, error)
            self.relay.stats.errors["target_unreachable"] += 1
            self.relay.forget(self.key)

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, base)
        if self.closed:
            self.transport.close()
            return
        waiting, self.waiting = self.waiting, []
        for datagram in waiting:
            self._deliver(datagram)

    def send(self, datagram: bytes) -> None:
        self.last_active = time.monotonic()
        if self.transport is None:
            if len(self.waiting) >= MAX_WAITING:
                self.relay.stats.drop(self.tunnel.domain, "flow_opening")
                return
            self.waiting.append(datagram)
            return
        self._deliver(datagram)

    def _deliver(self, datagram: bytes) -> None:
        assert self.transport is not None
        stats = self.relay.stats
        stats.datagrams_in[self.tunnel.domain] += 1
        stats.received_bytes[self.tunnel.domain] += len(datagram)
        self.transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.last_active = time.monotonic()
        self.relay.answer(self, data)

    def error_received(self, exc: Exception) -> None:
        self.relay.stats.errors["udp_target"] += 1  # e.g. nobody listens (ICMP unreachable)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _same(now: UdpTunnel | None, before: UdpTunnel) -> bool:
    """Whether ``now`` goes where ``before`` did, endpoints aside (they are followed live)."""
    return now is not None and now.domain == before.domain and same_place(now.target, before.target)
