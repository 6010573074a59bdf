"""A client's TCP connection spliced, byte for byte, to a stream to the Tunnel's agent: TCP
Tunnels' ports, and TLS-passthrough connections on the HTTPS port.

Both directions carry backpressure (a side that stops reading pauses the other) and half-closes
(a client that is done sending still gets the rest of the answer, as with ``ssh host cmd <
file``). A connection with no traffic either way for ``ClientLimits.tcpIdleTimeoutSeconds`` is
closed; so are a Tunnel's connections when its route goes elsewhere or away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from kakuremichi.edge.connection_caps import ConnectionCaps
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.mux import MuxDialer, MuxStream
from kakuremichi.edge.proxy_header import V1_PREFIX, Address, may_begin_header
from kakuremichi.edge.request_heads import client_address
from kakuremichi.edge.stats import EdgeStats
from kakuremichi.edge.stream_names import StreamName

CLOSE_TIMEOUT = 5.0
"""A connection being closed whose client takes nothing of what is left this long is cut off."""
log = logging.getLogger(__name__)


class Splices:
    """The open spliced connections of one gateway process, by Tunnel."""

    def __init__(self, stats: EdgeStats, dialer: MuxDialer) -> None:
        self.stats = stats
        self.dialer = dialer
        self.links: set[ClientLink] = set()
        self.idle_timeout = 3600.0

    def close_where(self, stale: Callable[[ClientLink], bool]) -> None:
        for link in [link for link in self.links if stale(link)]:
            link.close()

    def sweep(self, now: float) -> None:
        """Close the connections idle for longer than the timeout; cut off those being
        closed whose client will not take the rest (a zero window holds a close forever)."""
        limit = now - self.idle_timeout
        for link in list(self.links):
            if link.closing_since:
                transport = link.transport
                if transport is None:
                    continue
                left = transport.get_write_buffer_size()
                if left < link.closing_left:  # still taking it, however slowly
                    link.closing_left, link.closing_since = left, now
                elif now - link.closing_since > CLOSE_TIMEOUT:
                    transport.abort()
            elif link.last_active < limit:
                self.stats.limit_hits["tcp_idle_timeout"] += 1
                link.close()

    def close_all(self) -> None:
        for link in list(self.links):
            link.close()


class ClientLink(asyncio.Protocol):
    """The client's side: what it sends goes to the stream, what the stream brings back goes
    to it. ``first`` is what was read before the splice began (a peeked ClientHello)."""

    __slots__ = (
        "admitted", "caps", "client", "client_eof", "closing_left", "closing_since", "domain",
        "first",
        "last_active", "route", "screening", "splices", "stats", "stream", "stream_eof",
        "transport",
    )  # fmt: skip

    def __init__(
        self,
        splices: Splices,
        route: GatewayRoute,
        caps: ConnectionCaps,
        admitted: bytes | None,
        client: Address | None = None,
        first: bytes = b"",
        screen: bool = False,
    ) -> None:
        self.splices = splices
        self.stats = splices.stats
        self.route = route
        self.domain = route.domain
        self.caps = caps
        self.admitted = admitted
        """The connection's key in ``caps`` (it counts there until it is lost); None: it is
        admitted (or refused) when it is made."""
        self.client = client
        """The client's address when a trusted load balancer said it (PROXY header)."""
        self.first = first
        self.screening: bytearray | None = bytearray() if screen else None
        """The port reads PROXY headers from its load balancers, and this client is not one:
        the first bytes wait here while they may be the beginning of a header, and a
        connection that begins with one is refused (a client posing as a load balancer)."""
        self.transport: asyncio.Transport | None = None
        self.stream: MuxStream | None = None
        self.client_eof = self.stream_eof = False
        self.last_active = time.monotonic()
        self.closing_since = 0.0
        """When it was closed, or last took some of what was left to send (0: open)."""
        self.closing_left = 1 << 62
        """What was left to send then."""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, base)
        route = self.route
        if route.agent_ip is None or not route.enabled:
            transport.abort()
            return
        if self.admitted is None:
            address = (
                self.client[0].encode()
                if self.client
                else client_address(transport.get_extra_info("peername"))
            )
            self.admitted = self.caps.admit(address)
            if self.admitted is None:  # over a connection cap (counted)
                transport.abort()
                return
        self.splices.links.add(self)
        self.stats.active_connections += 1
        self.stats.tunnel_connections[self.domain] += 1
        client = self.client or _address(transport.get_extra_info("peername"))
        gateway = _address(transport.get_extra_info("sockname"))
        name = StreamName(self.domain, client, gateway) if route.client_address else None
        upstream = StreamSide(self)
        self.stream = self.splices.dialer.open_stream(
            route.agent_ip, name.encode() if name is not None else self.domain, upstream
        )
        if self.first:
            first, self.first = self.first, b""
            self.data_received(first)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.stats.received_bytes[self.domain] += len(data)
        if self.screening is not None:
            self.screening += data
            if may_begin_header(self.screening):
                if len(self.screening) >= len(V1_PREFIX):  # "PROXY " or more of a v2 header
                    self.stats.limit_hits["proxy_header"] += 1
                    if self.transport is not None:
                        self.transport.abort()
                return
            data, self.screening = bytes(self.screening), None
        if self.stream is not None:
            self.stream.write(data)

    def eof_received(self) -> bool | None:
        self.client_eof = True
        if self.screening is not None:  # what was held back goes on before the end
            held, self.screening = bytes(self.screening), None
            if held and self.stream is not None:
                self.stream.write(held)
        if self.stream is not None and not self.stream.is_closing():
            self.stream.write_eof()
        if self.stream_eof:
            self.close()
            return None
        return True  # keep the connection: the answer may still be coming

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted is not None:
            self.caps.leave(self.admitted)
            self.admitted = None
        if self in self.splices.links:
            self.splices.links.discard(self)
            self.stats.active_connections -= 1
        if self.stream is not None:
            self.stream.close()

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause_reading()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume_reading()

    def close(self) -> None:
        if not self.closing_since:
            self.closing_since = time.monotonic()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.stream is not None:
            self.stream.close()


class StreamSide(asyncio.Protocol):
    """The agent's side of a spliced connection."""

    __slots__ = ("link",)

    def __init__(self, link: ClientLink) -> None:
        self.link = link

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        pass  # (the stream is the link's from open_stream on)

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_active = time.monotonic()
        link.stats.sent_bytes[link.domain] += len(data)
        if link.transport is not None:
            link.transport.write(data)

    def eof_received(self) -> bool | None:
        link = self.link
        link.stream_eof = True
        transport = link.transport
        if link.client_eof or transport is None or transport.is_closing():
            link.close()
            return None
        if transport.can_write_eof():
            transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        link = self.link
        if exc is not None:
            link.stats.errors["tunnel_stream_lost"] += 1
        if not link.closing_since:
            link.closing_since = time.monotonic()
        if link.transport is not None and not link.transport.is_closing():
            link.transport.close()  # what was written still goes out first

    def pause_writing(self) -> None:
        if self.link.transport is not None:
            self.link.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.link.transport is not None:
            self.link.transport.resume_reading()


def _address(peer: object) -> Address | None:
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    host = str(peer[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(peer[1])
