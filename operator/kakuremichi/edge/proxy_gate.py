"""A gateway port behind a load balancer that speaks the PROXY protocol
(``Gateway.spec.acceptProxyProtocol``): from a trusted address (``trustedProxies``) the
connection must begin with a PROXY header, whose client address then stands for the
connection's (per-address limits, ``X-Forwarded-For``, the PROXY headers agents write); the
rest goes to the port's own protocol. From anyone else the port's protocol gets the connection
at once and sees any header as the garbage it is there (TLS and HTTP refuse it; a TCP Tunnel's
port refuses a connection that begins with one, :mod:`kakuremichi.edge.splice`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import cast

from kakuremichi.edge.proxy_header import Address, ProxyHeaderError, parse
from kakuremichi.edge.request_heads import IpNetwork, client_address, trusted
from kakuremichi.edge.stats import EdgeStats

log = logging.getLogger(__name__)
Inner = Callable[[Address | None], asyncio.Protocol]
"""The port's own protocol for a connection, told the client's address when a trusted load
balancer said it (None: the connection's own address stands)."""


class ProxySettings:
    """What the gateway's config says, read by each new connection."""

    def __init__(self) -> None:
        self.enabled = False
        self.trusted: tuple[IpNetwork, ...] = ()
        self.timeout = 10.0

    def set(self, enabled: bool, trusted_proxies: Sequence[IpNetwork], timeout: float) -> None:
        self.enabled = enabled and bool(trusted_proxies)
        self.trusted = tuple(trusted_proxies)
        self.timeout = timeout

    def factory(self, inner: Inner, stats: EdgeStats) -> Callable[[], asyncio.Protocol]:
        """A server's protocol factory: the port's own protocol, behind a gate while PROXY
        headers are accepted."""

        def make() -> asyncio.Protocol:
            if not self.enabled:
                return inner(None)
            return ProxyHeaderGate(inner, self, stats)

        return make


class ProxyHeaderGate(asyncio.Protocol):
    __slots__ = ("buffer", "inner", "settings", "stats", "timer", "transport")

    def __init__(self, inner: Inner, settings: ProxySettings, stats: EdgeStats) -> None:
        self.inner = inner
        self.settings = settings
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, base)
        if not trusted(client_address(transport.get_extra_info("peername")), self.settings.trusted):
            self._hand_over(None, b"")
            return
        self.timer = asyncio.get_running_loop().call_later(self.settings.timeout, self._late)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        try:
            header = parse(self.buffer)
        except ProxyHeaderError as error:
            self._refuse(str(error))
            return
        if header is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        rest = bytes(self.buffer[header.length :])
        self.buffer = bytearray()
        self._hand_over(header.source, rest)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _hand_over(self, source: Address | None, rest: bytes) -> None:
        assert self.transport is not None
        inner = self.inner(source)
        self.transport.set_protocol(inner)
        inner.connection_made(self.transport)
        if rest and not self.transport.is_closing():
            inner.data_received(rest)

    def _refuse(self, why: str) -> None:
        self.stats.limit_hits["proxy_header"] += 1
        log.debug("refused a connection from a trusted proxy: %s", why)
        if self.transport is not None:
            self.transport.abort()

    def _late(self) -> None:
        self.timer = None
        self._refuse("no PROXY header in time")
