"""TLS for the gateway's client connections, over memory BIOs on a plain TCP transport.

Why not the event loop's own TLS (``create_server(ssl=...)``): uvloop's TLS transport keeps a
256 KiB read buffer per connection and more bookkeeping, about 24 KiB resident per idle
connection; this keeps only OpenSSL's own state (it releases its record buffers while a
connection is idle), about 16 KiB, and measured as fast (``bench/README.md``). The application
protocol sees the usual transport methods; ``get_extra_info("ssl_object")`` is the
:class:`ssl.SSLObject`, whose ``context`` is the one the SNI callback picked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from kakuremichi.edge.client_hello import HelloReader
from kakuremichi.edge.connection_caps import ConnectionCaps
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.proxy_header import Address
from kakuremichi.edge.request_heads import client_address
from kakuremichi.edge.stats import EdgeStats

READ_SIZE = 16 * 1024
"""The plaintext of one TLS record at most: what one read returns anyway."""
log = logging.getLogger(__name__)


class Passthrough(Protocol):
    """Where TLS-passthrough connections go (the gateway's proxy)."""

    @property
    def passthrough(self) -> Mapping[str, GatewayRoute]:
        """TLS Tunnels by domain (empty: no ClientHello is peeked at)."""

    def pass_through(
        self,
        route: GatewayRoute,
        transport: asyncio.Transport,
        admitted: bytes,
        client: Address | None,
        first: bytes,
    ) -> None:
        """Take the connection over, ``first`` (the ClientHello) being what it sent so far."""


class TlsServerConnection(asyncio.Protocol):
    """One accepted TCP connection: the TLS handshake, then plaintext to and from the
    application protocol made by ``factory`` (created once the handshake is done). A
    connection that asks (SNI) for a TLS-passthrough Tunnel's name is handed to ``router``
    as it is, before any TLS of the gateway's."""

    __slots__ = (
        "admitted", "app", "caps", "client", "closing", "context", "factory", "hello",
        "incoming", "outgoing", "read_scheduled", "reading_paused", "router", "stats", "timer",
        "tls", "transport",
    )  # fmt: skip

    def __init__(
        self,
        context: ssl.SSLContext,
        factory: Callable[[], asyncio.Protocol],
        stats: EdgeStats,
        caps: ConnectionCaps,
        router: Passthrough | None = None,
        client: Address | None = None,
    ) -> None:
        self.context = context
        self.factory = factory
        self.stats = stats
        self.caps = caps
        self.router = router
        self.client = client
        """The client's address when a trusted load balancer said it (PROXY header): the
        connection's peer name from then on."""
        self.hello: HelloReader | None = None
        """The first bytes, held while the ClientHello is peeked at (TLS Tunnels exist)."""
        self.admitted: bytes | None = None
        """The connection's key in ``caps`` once it counts there."""
        self.transport: asyncio.Transport | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.app: asyncio.Protocol | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.reading_paused = False
        self.read_scheduled = False

    # --- the TCP side ----------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        peer = self.client or base.get_extra_info("peername")
        self.admitted = self.caps.admit(client_address(peer))
        if self.admitted is None:  # over a connection cap: not even a handshake
            self.closing = True
            self.transport.abort()
            return
        timeout = self.caps.limits.handshake_timeout_seconds
        self.timer = asyncio.get_running_loop().call_later(timeout, self._give_up)
        if self.router is not None and self.router.passthrough:
            self.hello = HelloReader()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # a failed handshake or a close in progress: nothing more is read
        if self.hello is not None:
            peeked = self.hello.feed(data)
            if not peeked.complete:
                return
            data, self.hello = bytes(self.hello.raw), None
            assert self.router is not None
            route = self.router.passthrough.get(peeked.name or "")
            if route is not None and self._pass_through(route, data):
                return
        self.incoming.write(data)
        if self.app is None and not self._handshake():
            return
        if not self.reading_paused:
            self._read()

    def eof_received(self) -> bool | None:
        self.incoming.write_eof()
        if self.app is not None and not self.reading_paused:
            self._read()
        return None  # TLS has no half-close: done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted is not None:
            self.caps.leave(self.admitted)
            self.admitted = None
        if self.timer is not None:
            self.timer.cancel()
        self.closing = True
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # --- the application's transport -------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.transport is None:
            return
        try:
            self.tls.write(data)
        except ssl.SSLError as error:
            log.debug("TLS write failed: %s", error)
            self.abort()
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send close_notify after what was written, then close the TCP connection."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        with contextlib.suppress(ssl.SSLError):  # the peer's close_notify is not awaited
            self.tls.unwrap()
        self._flush()
        self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def is_closing(self) -> bool:
        return self.closing or self.transport is None or self.transport.is_closing()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
            if not self.read_scheduled:  # plaintext may be waiting inside the TLS object
                self.read_scheduled = True
                asyncio.get_running_loop().call_soon(self._read_later)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.tls
        if name == "peername" and self.client is not None:
            return self.client
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    # --- internals -------------------------------------------------------------------------

    def _pass_through(self, route: GatewayRoute, first: bytes) -> bool:
        """Hand the connection to the TLS Tunnel's splice (False: it has none to go to)."""
        if self.transport is None or self.admitted is None or self.router is None:
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        admitted, self.admitted = self.admitted, None  # the splice counts it from now on
        self.closing = True  # nothing more of this object's
        self.router.pass_through(route, self.transport, admitted, self.client, first)
        return True

    def _handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as error:
            self.stats.errors["tls_handshake"] += 1
            log.debug("TLS handshake failed: %s", error)
            self._flush()  # the alert, if any
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._flush()
        self.app = self.factory()
        self.app.connection_made(cast(asyncio.Transport, self))
        return not self.closing

    def _read(self) -> None:
        app = self.app
        tls = self.tls
        while app is not None and not self.reading_paused and not self.closing:
            try:
                data = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a bare EOF
                data = b""
            except ssl.SSLError as error:
                log.debug("TLS read failed: %s", error)
                self.abort()
                return
            if not data:
                if not app.eof_received():
                    self.close()
                return
            app.data_received(data)
            app = self.app
            if not self.incoming.pending and not tls.pending():
                break  # all read: skip the read that would only raise SSLWantReadError
        self._flush()  # key updates, session tickets

    def _read_later(self) -> None:
        self.read_scheduled = False
        if not self.reading_paused:
            self._read()

    def _flush(self) -> None:
        transport = self.transport
        if self.outgoing.pending and transport is not None and not transport.is_closing():
            transport.write(self.outgoing.read())

    def _give_up(self) -> None:
        self.timer = None
        if self.app is None and self.transport is not None:
            self.stats.errors["tls_handshake_timeout"] += 1
            self.stats.limit_hits["handshake_timeout"] += 1
            self.transport.abort()
