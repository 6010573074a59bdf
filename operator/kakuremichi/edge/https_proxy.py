"""The gateway's HTTPS data path: TLS in, HTTP/1.1 over WireGuard to the owning agent.

Built for throughput (see issue 8): asyncio Protocols, no stream wrappers. Each client connection
is bound to one upstream stream to the agent for as long as it has requests in flight, and idle
upstream streams are kept per tunnel and reused. Streams to one agent share one TCP connection
(:mod:`kakuremichi.edge.mux`), so requests from many clients travel in shared segments. Only
request heads are rebuilt (to set ``X-Forwarded-*``, parsed by httptools in C); bodies are
passed on as they arrive. Responses are passed through untouched: the response parser only
watches them, to count status codes and to know when an upstream stream is idle again (and adds
``Strict-Transport-Security`` where a tunnel asks for it). After an ``Upgrade`` (WebSocket) the
origin answers 101, both directions are spliced raw; until then nothing more of the client's
goes upstream. Backpressure is end to end: a slow reader pauses the other side.

Every client is hostile until checked: request heads are bounded while read and validated before
anything is forwarded (:mod:`kakuremichi.edge.request_heads`), connections are capped per client
address and per process (:mod:`kakuremichi.edge.connection_caps`), and a stream is reused only
after a complete exchange, so no client's bytes can become part of another client's request.

Tunnels whose target speaks h2c (HTTP/2 without TLS, e.g. gRPC) are different: their TLS offers
only ``h2``, and a client that negotiates it has its decrypted connection spliced raw to a
stream of its own from the first byte (HTTP/2's preface and frames pass untouched, trailers
included; no X-Forwarded-* headers). A client there without HTTP/2 is answered 505. A GRPCRoute's
host with rules is offered ``h2`` too, and its calls are routed one by one
(:mod:`kakuremichi.edge.grpc_calls`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import Server
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import httptools

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.api.request_paths import PathRefused, normalize_path
from kakuremichi.api.resources import ClientLimits
from kakuremichi.edge import request_heads
from kakuremichi.edge.connection_caps import ConnectionCaps
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.grpc_calls import CallRouter
from kakuremichi.edge.mux import MuxDialer, MuxStream, PeerUnreachable
from kakuremichi.edge.pages import error_response
from kakuremichi.edge.proxy_gate import ProxySettings
from kakuremichi.edge.proxy_header import Address
from kakuremichi.edge.request_heads import (
    HOP_BY_HOP,
    VERSIONS,
    IpNetwork,
    address_field,
    client_address,
    connection_options,
    parse_networks,
    request_target,
    transfer_coding_error,
)
from kakuremichi.edge.request_routing import Edits, Request, RequestRouter
from kakuremichi.edge.splice import ClientLink, Splices
from kakuremichi.edge.stats import EdgeStats
from kakuremichi.edge.tls import TlsServerConnection

RESPONSE_TIMEOUT = 120.0
"""No byte of a response this long after the request: 504."""
LINGER = 1.0
"""After refusing a head still being sent, reading goes on this long before the close, so that
the client reads the answer instead of a reset."""
CLOSE_TIMEOUT = 5.0
"""A connection being closed whose client does not take what is left to send is cut off."""
MAX_TRAILER_BYTES = 8 * 1024
"""Trailers (and chunk-size lines) read between two pieces of a chunked body."""
POOL_IDLE_TIMEOUT = 15.0
"""Idle upstream connections are dropped before typical origin keep-alive timeouts hit them."""
MAX_IDLE_PER_TUNNEL = 256
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS"))
NOT_TRAILERS = frozenset((b"content-length", b"transfer-encoding", b"host", b"trailer"))
"""Fields a trailer must not carry (RFC 9110 6.5.1): dropped, the others passed on."""
log = logging.getLogger(__name__)


UpstreamKey = tuple[str, str, str]
"""Agent address, domain, stream name: idle upstream streams are reused by this."""


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    stream: str
    path: bytes
    edits: Edits | None


@dataclass(slots=True)
class Pending:
    """A request sent upstream and not yet answered."""

    sent_at: float
    is_head: bool
    replay: bytes | None
    """The whole request, when it may be sent again on a fresh connection (idempotent, no
    body) should a reused upstream connection turn out to be closed."""


def host_name(host: bytes) -> str:
    """The name in a Host header, without a port, lower-cased."""
    name, _, port = host.rpartition(b":")
    if not name or not port.isdigit():
        name = host
    return name.decode("ascii", "replace").strip().rstrip(".").lower()


class HttpsProxy:
    """Routes, the idle upstream pool, and every open connection of one gateway."""

    def __init__(self, stats: EdgeStats, relay_port: int = RELAY_PORT) -> None:
        self.stats = stats
        self.dialer = MuxDialer(relay_port)
        self.routes: dict[str, GatewayRoute] = {}
        """HTTP Tunnels' routes, by domain."""
        self.passthrough: dict[str, GatewayRoute] = {}
        """TLS Tunnels' routes, by domain: their connections are passed on undecrypted."""
        self.idle: dict[UpstreamKey, list[Upstream]] = {}
        self.clients: set[ClientConnection] = set()
        self.limits = ClientLimits()
        self.caps = ConnectionCaps(stats, self.limits)
        self.trusted_proxies: tuple[IpNetwork, ...] = ()
        self.proxy_headers = ProxySettings()
        self.splices = Splices(stats, self.dialer)
        """TLS-passthrough connections (and, in the gateway process, TCP Tunnels')."""

    def set_front_end(
        self, limits: ClientLimits | None, trusted_proxies: Sequence[str],
        accept_proxy_protocol: bool = False,
    ) -> None:  # fmt: skip
        """Limits and trusted proxies from the next connection or request on."""
        self.limits = self.caps.limits = limits or ClientLimits()
        self.trusted_proxies = self.caps.exempt = parse_networks(trusted_proxies)
        self.proxy_headers.set(
            accept_proxy_protocol, self.trusted_proxies, self.limits.handshake_timeout_seconds
        )
        self.splices.idle_timeout = self.limits.tcp_idle_timeout_seconds

    def tls_factory(self, front: ssl.SSLContext) -> Callable[[], asyncio.Protocol]:
        """The HTTPS port's protocol factory (certificates by SNI from ``front``)."""
        return self.proxy_headers.factory(
            lambda client: TlsServerConnection(
                front, self.protocol, self.stats, self.caps, self, client
            ),
            self.stats,
        )

    def pass_through(
        self, route: GatewayRoute, transport: asyncio.Transport, admitted: bytes,
        client: Address | None, first: bytes,
    ) -> None:  # fmt: skip
        link = ClientLink(self.splices, route, self.caps, admitted, client, first)
        transport.set_protocol(link)
        link.connection_made(transport)

    def set_routes(self, routes: Mapping[str, GatewayRoute]) -> None:
        """Serve ``routes`` from the next request on; idle upstream connections toward a
        place a tunnel no longer goes are closed, all others are left alone. (TCP and UDP
        routes are the gateway's ports' to serve, over the same connections to agents.)"""
        self.routes = {d: r for d, r in routes.items() if r.protocol == "HTTP"}
        # (Only those that serve: no ClientHello is peeked at for a disabled one, whose
        # clients the gateway's own TLS refuses.)
        self.passthrough = {d: r for d, r in routes.items() if r.protocol == "TLS" and r.serving}
        self.splices.close_where(
            lambda link: (
                link.route.protocol == "TLS" and self.passthrough.get(link.domain) != link.route
            )
        )
        self.dialer.keep_only(
            {r.agent_ip for r in routes.values() if r.serving and r.agent_ip is not None}
        )
        for key, idle in list(self.idle.items()):
            if not self.still_goes(key):
                del self.idle[key]
                for upstream in idle:
                    upstream.close()

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def still_goes(self, key: UpstreamKey) -> bool:
        """Whether requests still go where a stream of ``key`` goes."""
        route = self.routes.get(key[1])
        if route is None or not route.enabled or route.agent_ip != key[0]:
            return False
        # (a Tunnel's stream is named by its domain: one comparison on the common path)
        return route.rules is None if key[2] == key[1] else route.serves_stream(key[2])

    def acquire(self, route: GatewayRoute, client: ClientConnection, stream: str) -> Upstream:
        """A stream named ``stream`` (the domain, or a backend its rules chose) to the route's
        agent: an idle one, else a new one."""
        assert route.agent_ip is not None  # (callers answer 503 for a route without agent)
        key = (route.agent_ip, route.domain, stream)
        idle = self.idle.get(key)
        while idle:
            upstream = idle.pop()
            if not upstream.closed and upstream.reusable:
                upstream.client = client
                upstream.reused = True
                upstream.hsts = route.hsts_line
                return upstream
            upstream.close()  # e.g. bytes arrived after its last response: not trustworthy
        upstream = Upstream(self, key, client)
        upstream.hsts = route.hsts_line
        self.dialer.open_stream(route.agent_ip, stream, upstream)
        return upstream

    def release(self, upstream: Upstream) -> None:
        upstream.client = None
        idle = self.idle.setdefault(upstream.key, [])
        if (
            upstream.closed
            or not upstream.reusable
            or upstream.request_open
            or upstream.pending
            or len(idle) >= MAX_IDLE_PER_TUNNEL
        ):
            upstream.close()
            return
        if not self.still_goes(upstream.key):
            upstream.close()
            return
        upstream.idle_since = time.monotonic()
        upstream.is_replay = False
        if upstream.transport is not None:
            upstream.transport.resume_reading()  # its last client may have paused it
        idle.append(upstream)

    def forget(self, upstream: Upstream) -> None:
        idle = self.idle.get(upstream.key)
        if idle and upstream in idle:
            idle.remove(upstream)

    async def sweep_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Close what has been idle too long; answer 504 for responses that never start."""
        for client in list(self.clients):
            client.check_timeouts(now)
        for idle in self.idle.values():
            for upstream in [u for u in idle if now - u.idle_since > POOL_IDLE_TIMEOUT]:
                upstream.close()
        self.splices.sweep(now)

    def close_all(self) -> None:
        self.splices.close_all()
        for client in list(self.clients):
            client.close()
        for idle in self.idle.values():
            for upstream in idle:
                upstream.close()
        self.idle.clear()
        self.dialer.close_all()


class ClientConnection(asyncio.Protocol):
    """One client's TLS connection (the handshake is done when this is created).

    Every request is checked before any of it goes upstream (:mod:`request_heads`), and its
    head is bounded while it is read: bytes, fields, target length, a deadline. An upstream
    stream serves the connection while a request is in flight and returns to the shared pool
    only after a complete exchange (the whole request forwarded, the whole response read)."""

    __slots__ = (
        "calls", "chunked", "client_ip", "closing_since", "codings", "connection", "deferred",
        "deferred_linger", "domain", "fields", "forwarded", "forwarding", "has_body",
        "head_buffer", "head_received", "head_started", "header_names", "headers", "host",
        "hosts", "keep_alive", "last_active", "maybe_trailers", "parser", "proxy", "raw",
        "reading_head", "stats", "stopped", "trailer_bytes", "trailers", "transport", "upgrade",
        "upgrade_wait", "upstream", "url", "write_blocked_since",
    )  # fmt: skip
    # slots: thousands of idle keep-alive clients are the gateway's main memory cost

    def __init__(self, proxy: HttpsProxy) -> None:
        self.proxy = proxy
        self.stats = proxy.stats
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.domain = ""
        """The name the client asked for in SNI; every request must be for it."""
        self.client_ip = b""
        self.upstream: Upstream | None = None
        self.calls: CallRouter | None = None
        """An HTTP/2 client of a host whose gRPC calls are routed one by one."""
        self.raw = False
        self.stopped = False
        self.keep_alive = True
        self.deferred: bytes | None = None
        self.deferred_linger = False
        self.last_active = time.monotonic()
        self.closing_since = 0.0
        """When the gateway closed the connection (0: it has not); a client that will not take
        the rest is cut off after :data:`CLOSE_TIMEOUT`."""
        self.write_blocked_since = 0.0
        """Since when the client has not been taking what is written to it (0: it takes it)."""
        self.head_buffer = bytearray()
        """A head being read, parsed only once it is whole (or at its limit): in one call, so
        that a head fed one byte at a time costs no more than one fed at once."""
        self.reading_head = True
        """Between requests or inside a head: what arrives counts against the head limits."""
        self.head_received = 0
        self.head_started = 0.0
        """When the head being read began (0: none yet): it must end within the deadline."""
        self.upgrade_wait: bytearray | None = None
        """An upgrade was asked for and the origin has not answered: what the client sent
        after it waits here (reading is paused) until a 101, or is parsed as HTTP again."""
        # the request being read
        self.url = b""
        self.headers: list[bytes] = []
        self.header_names: list[bytes] = []
        self.host = b""
        self.hosts = 0
        self.fields = 0
        self.codings: list[bytes] = []
        self.connection: list[bytes] = []
        self.forwarded: list[bytes] = []
        self.upgrade = b""
        self.chunked = False
        self.forwarding = False
        self.has_body = False
        self.trailers: list[bytes] = []
        self.maybe_trailers = False
        self.trailer_bytes = 0

    # --- transport callbacks ---------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        self.domain = getattr(tls.context, "domain", "") if tls is not None else ""
        self.client_ip = client_address(transport.get_extra_info("peername"))
        self.stats.connections_total += 1
        self.stats.active_connections += 1
        self.proxy.clients.add(self)
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            self._pass_through()

    def _pass_through(self) -> None:
        """An HTTP/2 client of an h2c tunnel: every byte both ways, on a stream of its own."""
        route = self.proxy.routes.get(self.domain)
        if route is None or not route.enabled or not route.h2c or route.agent_ip is None:
            self.close()  # the tunnel changed during the handshake, or has no agent now
            return
        self.raw = True
        self.stats.http2_connections[self.domain] += 1
        if route.rules is not None:  # (a GRPCRoute's host: each call to the backend it matches)
            self.calls = CallRouter(self.proxy, self, self.domain)
            return
        key = (route.agent_ip, route.domain, route.domain)
        upstream = self.upstream = Upstream(self.proxy, key, self)
        upstream.untracked, upstream.reusable = True, False
        self.proxy.dialer.open_stream(route.agent_ip, route.domain, upstream)

    def data_received(self, data: bytes) -> None:
        now = self.last_active = time.monotonic()
        self.stats.received_bytes[self.domain] += len(data)
        if self.raw:
            if self.calls is not None:
                self.calls.received(data)
            elif self.upstream is not None:
                self.upstream.send(data)
            return
        if self.stopped:
            return
        if self.upgrade_wait is not None:
            self.upgrade_wait += data  # reading is paused: at most what was already read
            if len(self.upgrade_wait) > self.proxy.limits.max_head_bytes:
                self._over_limit("max_head_bytes", 431, "Too much was sent before the upgrade.")
            return
        if (self.reading_head or self.maybe_trailers) and not self.head_started:
            self.head_started = now  # any byte starts the head's deadline (even bare CRLFs)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        limit = self.proxy.limits.max_head_bytes
        while data:
            if self.reading_head:
                room = limit - self.head_received
                if room <= 0:
                    self._over_limit("max_head_bytes", 431, "The request head is too large.")
                    return
                piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
                self.head_received += len(piece)
                buffer = self.head_buffer
                searched = max(0, len(buffer) - 2)
                buffer += piece
                if buffer.find(b"\n\r\n", searched) < 0 and buffer.find(b"\n\n", searched) < 0:
                    line_limit = self.proxy.limits.max_target_bytes + 64  # (method, version)
                    if len(buffer) > line_limit and buffer.find(b"\n", 0, line_limit) < 0:
                        self._over_limit("max_target_bytes", 414, "The request target is too long.")
                    elif self.head_received >= limit:
                        self._over_limit("max_head_bytes", 431, "The request head is too large.")
                    return  # not whole yet: nothing is parsed
                piece, self.head_buffer = bytes(buffer), bytearray()
            else:
                piece, data = data, b""
                if self.maybe_trailers:
                    self.trailer_bytes += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                self._await_switch(piece[int(upgrade.args[0]) :] + data)
                return
            except httptools.HttpParserCallbackError:
                log.exception("request handling failed")
                self.fail(500, "The gateway failed to handle this request.")
                return
            except httptools.HttpParserError:
                self.fail(400, "The request is not valid HTTP/1.1.")
                return
            if self.stopped:
                return
        if self.reading_head and self.head_received >= limit:
            self._over_limit("max_head_bytes", 431, "The request head is too large.")
        elif self.trailer_bytes > min(limit, MAX_TRAILER_BYTES):
            self._over_limit("max_head_bytes", 431, "The request's trailer fields are too large.")

    def eof_received(self) -> bool | None:
        return None  # TLS: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.clients.discard(self)
        self.stats.active_connections -= 1
        calls, self.calls = self.calls, None
        if calls is not None:
            calls.close()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.client_gone()

    def pause_writing(self) -> None:
        if not self.write_blocked_since:
            self.write_blocked_since = time.monotonic()
        if self.calls is not None:
            self.calls.pause()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked_since = 0.0
        if self.calls is not None:
            self.calls.resume()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def resume_client(self) -> None:
        """Read from the client again, unless it must not be read from now: an upgrade
        awaits its answer, or the connection is answered and closing."""
        if (
            self.transport is not None
            and self.upgrade_wait is None
            and self.deferred is None
            and not self.stopped
        ):
            self.transport.resume_reading()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.head_started:
            self.head_started = time.monotonic()
        self.url = b""
        self.headers = []
        self.header_names = []
        self.host = b""
        self.hosts = 0
        self.fields = 0
        self.codings = []
        self.connection = []
        self.forwarded = []
        self.upgrade = b""
        self.chunked = False
        self.has_body = False
        self.trailers = []
        self.maybe_trailers = False
        self.trailer_bytes = 0

    def on_url(self, url: bytes) -> None:
        if self.stopped:
            return
        if len(self.url) + len(url) > self.proxy.limits.max_target_bytes:
            self._over_limit("max_target_bytes", 414, "The request target is too long.")
            return
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stopped:
            return
        self.fields += 1
        if self.fields > self.proxy.limits.max_header_fields:
            self._over_limit("max_header_fields", 431, "The request has too many header fields.")
            return
        lower = name.lower()
        if self.forwarding:  # after the body: a trailer of a chunked body, passed on at its end
            if lower not in NOT_TRAILERS and lower not in HOP_BY_HOP and not address_field(lower):
                self.trailers.append(name + b": " + value + b"\r\n")
            return
        if lower in HOP_BY_HOP:
            if lower == b"transfer-encoding":
                self.codings.append(value)
                self.has_body = True
            elif lower == b"connection":
                self.connection.append(value)
            elif lower == b"upgrade":
                self.upgrade = value
            return  # the gateway writes its own
        if address_field(lower):
            if lower == b"x-forwarded-for":
                self.forwarded.append(value)  # kept only when a trusted proxy sent it
            return  # ours to set: a client must not choose the address the origin sees
        if lower == b"host":
            self.hosts += 1
            self.host = value
        elif lower == b"content-length":
            self.has_body = value.strip() not in (b"0", b"")
        self.headers.append(name + b": " + value + b"\r\n")
        self.header_names.append(lower)

    def on_headers_complete(self) -> None:
        if self.stopped:
            return  # pipelined behind a request answered here: the connection is closing
        self.reading_head = False
        self.head_started = 0.0
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method()
        if version not in VERSIONS:
            self.fail(400, "Only HTTP/1.0 and HTTP/1.1 requests are served here.")
            return
        if method == b"CONNECT":
            self.fail(405, "CONNECT is not supported.")
            return
        if self.hosts > 1:
            self.fail(400, "The request has more than one Host field.")
            return
        if not self.hosts and version == "1.1":
            self.fail(400, "An HTTP/1.1 request needs a Host field.")
            return
        path = self.url
        if not path.startswith(b"/"):  # (the common case costs one test)
            target = request_target(path, method)
            if target is None:
                self.fail(400, "The request target is neither a path nor an http(s) URL.")
                return
            if target.authority and host_name(target.authority) != self.domain:
                self.fail(400, f"This connection is for {self.domain}: the request target "
                               "names another host.")  # fmt: skip
                return
            path = target.path
        if self.codings:
            refusal = transfer_coding_error(self.codings, version)
            if refusal is not None:
                self.fail(400, refusal)
                return
        name = host_name(self.host) or self.domain
        route = self.proxy.routes.get(name)
        if route is None or not route.enabled:
            self.fail(404, f"No tunnel serves {name or 'this name'} here.")
            return
        if name != self.domain:
            self.fail(421, f"This connection is for {self.domain}, not {name}.")
            return
        if route.agent_ip is None:
            self.fail(503, f"The service of {name} is not reachable right now.")
            return
        if route.h2c:
            self.fail(505, f"{name} is served over HTTP/2 only (its service speaks h2c, e.g. "
                           "gRPC): use an HTTP/2 client.")  # fmt: skip
            return
        stream = name
        headers, header_names = self.headers, self.header_names
        if self.connection:  # (before any edit: a client cannot drop what a rule sets)
            dropped = connection_options(self.connection)
            if dropped:
                kept = [i for i, n in enumerate(header_names) if n not in dropped]
                headers = [headers[i] for i in kept]
                header_names = [header_names[i] for i in kept]
        router = route.router
        if router is not None:  # a host with rules (Ingress, HTTPRoute): a backend per request
            choice = self._route_request(router, name, method, path, headers, header_names)
            if choice is None:
                return
            stream, path = choice.stream, choice.path
            if choice.edits is not None:
                headers, header_names = choice.edits.apply(headers, header_names)
        self.keep_alive = parser.should_keep_alive()
        self.chunked = bool(self.codings)
        upgrade = bool(self.upgrade) and parser.should_upgrade()
        upstream = self.upstream
        if upstream is not None:  # (between requests a client holds none: the common case)
            elsewhere = upstream.key != (route.agent_ip, name, stream)
            if elsewhere and upstream.pending and not upstream.closed:
                # Pipelined behind a request to another backend: the answers must come in
                # order, so this one is not taken; the connection closes once those in flight
                # are answered, and the client sends it again on a new one (RFC 9112 9.3.2).
                self.stopped, self.keep_alive = True, False
                if self.transport is not None:
                    self.transport.pause_reading()
                return
            if elsewhere or upstream.closed:
                self.upstream = None
                upstream.client_gone()
                upstream = None
        if upstream is None:
            upstream = self.upstream = self.proxy.acquire(route, self, stream)
        if self.forwarded:
            forwarded_for, real_ip = request_heads.forwarded_for(
                self.client_ip, self.forwarded, self.proxy.trusted_proxies
            )
        else:
            forwarded_for = real_ip = self.client_ip
        host = self.host or name.encode()
        head = b"".join((
            method, b" ", path, b" HTTP/", version.encode(), b"\r\n",
            *headers,
            b"" if self.hosts else b"Host: " + host + b"\r\n",
            b"Transfer-Encoding: chunked\r\n" if self.chunked else b"",
            b"Connection: upgrade\r\nUpgrade: " + self.upgrade + b"\r\n" if upgrade else b"",
            b"X-Forwarded-For: ", forwarded_for,
            b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: ", host,
            b"\r\nX-Real-IP: ", real_ip,
            b"\r\n\r\n",
        ))  # fmt: skip
        replay = head if method in IDEMPOTENT and not self.has_body and not upgrade else None
        upstream.send_request(head, method == b"HEAD", replay)
        self.forwarding = True

    def _route_request(
        self, router: RequestRouter, name: str, method: bytes, target: bytes,
        headers: list[bytes], header_names: list[bytes],
    ) -> RoutedRequest | None:  # fmt: skip
        """The backend of a request to a host with rules, and the path that goes upstream
        (normalized: the one the rules matched); None once answered here."""
        raw_path, _, query = target.partition(b"?")
        try:
            path = normalize_path(raw_path)
            if b"#" in query:
                raise PathRefused(
                    "A request target with a fragment (#) is not served on this host."
                )
        except PathRefused as refusal:
            self.fail(400, str(refusal))
            return None
        choice = router.choose(Request(method, path, query, headers, header_names))
        if choice is None:
            self.fail(404, f"No route of {name} matches this request.")
            return None
        if choice.stream is None:
            self.fail(500, f"The route of {name} that matches this request has no backend.")
            return None
        return RoutedRequest(choice.stream, path + target[len(raw_path) :], choice.edits)

    def on_chunk_header(self) -> None:
        self.maybe_trailers = True  # the last chunk's header, unless data follows

    def on_body(self, body: bytes) -> None:
        if self.maybe_trailers:
            self.maybe_trailers = False
            self.trailer_bytes = 0
            self.head_started = 0.0
        if self.forwarding and self.upstream is not None:
            if self.chunked:
                self.upstream.send(b"%x\r\n%b\r\n" % (len(body), body))
            else:
                self.upstream.send(body)

    def on_message_complete(self) -> None:
        upstream = self.upstream
        if self.forwarding and upstream is not None:
            if self.chunked:
                upstream.send(b"".join((b"0\r\n", *self.trailers, b"\r\n")))
            upstream.request_open = False
        self.forwarding = False
        self.reading_head = True
        self.head_received = 0
        self.head_started = 0.0
        self.maybe_trailers = False
        self.trailer_bytes = 0

    # --- upgrades --------------------------------------------------------------------------

    def _await_switch(self, rest: bytes) -> None:
        """The client asked for an upgrade (e.g. WebSocket): nothing more goes upstream until
        the origin agrees with 101."""
        upstream = self.upstream
        if self.stopped:
            return  # refused here: the connection is closing
        if upstream is None:  # answered before its body ended: the upgrade cannot happen
            self.fail(400, "The upgrade was answered before its request ended.")
            return
        upstream.request_open = False
        upstream.reusable = False  # whatever the answer, this stream is done with HTTP
        self.forwarding = False
        self.upgrade_wait = bytearray(rest)
        if self.transport is not None:
            self.transport.pause_reading()

    def switch_protocols(self) -> bool:
        """The origin answered 101: both ways are bytes from here. False if no upgrade was
        asked for (a 101 nobody asked for: the stream cannot be trusted)."""
        rest, self.upgrade_wait = self.upgrade_wait, None
        if rest is None or self.upstream is None:
            return False
        self.raw = True
        if rest:
            self.upstream.send(bytes(rest))
        self.resume_client()
        return True

    def _upgrade_refused(self) -> None:
        """Any answer but 101: the connection stays HTTP, every check applies to what the
        client sent next, on a fresh parser and a fresh upstream stream."""
        rest, self.upgrade_wait = bytes(self.upgrade_wait or b""), None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        if not self.keep_alive:
            self.close()
            return
        self.parser = httptools.HttpRequestParser(self)
        self.reading_head, self.head_received, self.head_started = True, 0, 0.0
        if rest:
            self.head_started = time.monotonic()
            self._feed(rest)
        self.resume_client()  # (not if what followed was another upgrade, or refused)

    # --- our own ---------------------------------------------------------------------------

    def _over_limit(self, limit: str, code: int, detail: str) -> None:
        self.stats.limit_hits[limit] += 1
        self.fail(code, detail, linger=True)

    def fail(self, code: int, detail: str, linger: bool = False) -> None:
        """Answer this request ourselves and close, after any responses still in flight.
        ``linger``: the client may still be sending (an oversized head): keep reading and
        dropping for a moment so that it sees the answer rather than a reset."""
        self.stopped = True
        self.stats.requests[(self.domain, code)] += 1
        response = error_response(code, detail)
        upstream = self.upstream
        if self.forwarding and upstream is not None:
            # Half a request went upstream: that stream can carry nothing more.
            self.forwarding = False
            self.upstream = None
            alone = len(upstream.pending) == 1 and not upstream.response_started
            upstream.close()
            if alone:
                self.finish(response, linger)
            else:
                self.close()  # an earlier response is still on its way: no answer can follow
            return
        self.forwarding = False
        if upstream is not None and upstream.pending:
            self.deferred, self.deferred_linger = response, linger
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.finish(response, linger)

    def finish(self, response: bytes, linger: bool = False) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            if linger:
                asyncio.get_running_loop().call_later(LINGER, self.close)
            else:
                self.close()

    def upstream_idle(self) -> None:
        """Every request sent on the upstream stream has its full response."""
        upstream = self.upstream
        if self.deferred is not None:
            self.finish(self.deferred, self.deferred_linger)
        elif upstream is not None and upstream.request_open:
            # Answered before the request ended (a 401, 413 or redirect sent without reading
            # the body, as nginx, Go and Node do): what the origin does with the rest is
            # unknown, so the stream is not reused; the rest of the body is read and dropped.
            self.upstream = None
            upstream.close()
            if not self.keep_alive:
                self.close()
        elif self.upgrade_wait is not None:
            self._upgrade_refused()
        elif not self.keep_alive:
            self.close()
        elif not self.forwarding and not self.raw and upstream is not None:
            # Between requests a client holds nothing upstream (as nginx's keepalive pool):
            # idle clients cost no stream or origin connection, and the next request of any
            # client of this tunnel reuses it.
            self.upstream = None
            self.proxy.release(upstream)
            self.resume_client()  # in case the upstream had paused us

    def upstream_lost(self, upstream: Upstream, reason: str) -> None:
        if self.upstream is not upstream:
            return
        self.upstream = None
        if self.upgrade_wait is not None:
            self.upgrade_wait = None
            self.forwarding = False
        if not upstream.pending and not self.raw:
            if self.deferred is not None:
                self.finish(self.deferred, self.deferred_linger)
            elif not self.keep_alive or self.forwarding:  # (the rest of a request: nowhere)
                self.close()
            return
        if self.raw or upstream.response_started:
            self.close()
            return
        if (
            upstream.may_replay
            and not self.forwarding
            and all(p.replay is not None for p in upstream.pending)
        ):
            # A kept-alive stream the agent had just closed, or a connection that had died
            # unnoticed: nothing was processed, so the requests go again, once, on a fresh one.
            route = self.proxy.routes.get(self.domain)
            if (
                route is not None
                and route.agent_ip is not None
                and self.proxy.still_goes(upstream.key)
            ):
                fresh = self.upstream = self.proxy.acquire(route, self, upstream.key[2])
                fresh.is_replay = True
                for pending in upstream.pending:
                    assert pending.replay is not None
                    fresh.send_request(pending.replay, pending.is_head, None)
                    fresh.request_open = False
                return
        self.stats.errors[reason] += 1
        self.stats.requests[(self.domain, 502)] += 1
        self.stopped = True
        self.finish(error_response(502, f"The service behind {self.domain} is unreachable."))

    def check_timeouts(self, now: float) -> None:
        limits = self.proxy.limits
        upstream = self.upstream
        if self.closing_since:
            if now - self.closing_since > CLOSE_TIMEOUT and self.transport is not None:
                self.transport.abort()  # it will not take the rest: its place goes free
            return
        if self.write_blocked_since and (
            now - self.write_blocked_since > limits.keep_alive_timeout_seconds
        ):
            self.stats.limit_hits["send_timeout"] += 1  # a client that stopped reading
            self.close()
        elif self.raw:
            if now - self.last_active > limits.upgraded_idle_timeout_seconds:
                self.stats.limit_hits["upgraded_idle_timeout"] += 1
                self.close()
        elif (
            (self.reading_head or self.maybe_trailers)
            and self.head_started
            and not self.stopped
            and now - self.head_started > limits.head_timeout_seconds
        ):
            self.stats.limit_hits["head_timeout"] += 1
            self.stats.requests[(self.domain, 408)] += 1
            self.stopped = True
            if upstream is not None and upstream.pending:
                self.close()
            else:
                self.finish(error_response(408, "The request head did not arrive in time."))
        elif self.forwarding and now - self.last_active > limits.keep_alive_timeout_seconds:
            self.stats.limit_hits["keep_alive_timeout"] += 1  # silent inside a request body
            self.close()
        elif upstream is not None and upstream.untracked:
            # Responses no longer followed (after a pipelined HEAD): idle both ways is the end.
            if now - self.last_active > limits.keep_alive_timeout_seconds:
                self.stats.limit_hits["keep_alive_timeout"] += 1
                self.close()
        elif upstream is not None and upstream.pending:
            if not upstream.response_started and now - upstream.pending[0].sent_at > (
                RESPONSE_TIMEOUT
            ):
                self.stats.errors["response_timeout"] += 1
                self.stats.requests[(self.domain, 504)] += 1
                self.upstream = None
                upstream.close()
                self.stopped = True
                self.finish(error_response(504, f"{self.domain} did not answer in time."))
        elif now - self.last_active > limits.keep_alive_timeout_seconds:
            self.stats.limit_hits["keep_alive_timeout"] += 1
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closing_since:
            self.closing_since = time.monotonic()
            self.transport.close()


class Upstream(asyncio.Protocol):
    """A stream to an agent for one tunnel, carrying HTTP/1.1."""

    def __init__(self, proxy: HttpsProxy, key: UpstreamKey, client: ClientConnection) -> None:
        self.proxy = proxy
        self.key = key
        self.domain = key[1]
        self.client: ClientConnection | None = client
        self.transport: MuxStream | None = None
        self.pending: deque[Pending] = deque()
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.head_wait: bytearray | None = None
        self.untracked = False
        self.response_started = False
        self.reusable = True
        self.reused = False
        """Taken from the idle pool (the agent may have closed it meanwhile)."""
        self.is_replay = False
        self.closed = False
        self.idle_since = 0.0
        self.request_open = False
        """The last request's head went out and the rest of it has not: until it has, the
        stream belongs to that request whatever the origin answers."""
        self.hsts: bytes | None = None

    @property
    def may_replay(self) -> bool:
        """Requests lost here may go again: the stream or its connection may have been dead
        before they were sent, and they are not themselves a replay."""
        reused = self.reused or (
            self.transport is not None and self.transport.on_existing_connection
        )
        return reused and not self.is_replay

    def send_request(self, head: bytes, is_head: bool, replay: bytes | None) -> None:
        if is_head:
            if self.pending or self.untracked:
                self.untracked = True  # pipelined HEAD: stop watching, never reuse
                self.reusable = False
            else:
                self.head_wait = bytearray()  # the parser cannot be told a HEAD has no body
        self.pending.append(Pending(time.monotonic(), is_head, replay))
        self.request_open = True
        self.send(head)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def client_gone(self) -> None:
        if self.pending or self.request_open or not self.reusable or self.transport is None:
            self.close()
        else:
            self.proxy.release(self)

    def close(self) -> None:
        self.closed = True
        self.client = None
        if self.transport is not None:
            self.transport.close()

    # --- transport callbacks ---------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(MuxStream, base)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            self.close()  # nothing may arrive on an idle connection
            return
        if self.hsts is not None and not self.response_started and not self.untracked:
            client.transport.write(with_field(data, self.hsts, b"\r\nstrict-transport-security:"))
        else:
            client.transport.write(data)
        client.last_active = time.monotonic()
        self.proxy.stats.sent_bytes[self.domain] += len(data)
        self.response_started = True
        if not self.untracked:
            self._watch(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, TimeoutError):
            # The agent stopped acknowledging (it is gone): answer now, do not retry.
            self.is_replay = True
            self._lost("agent_timeout")
        elif isinstance(exc, PeerUnreachable):
            self.is_replay = True  # a second connect would only make the client wait again
            self._lost("agent_unreachable")
        else:
            self._lost("agent_closed")

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_client()

    def _lost(self, reason: str) -> None:
        self.closed = True
        self.proxy.forget(self)
        client, self.client = self.client, None
        if client is not None:
            client.upstream_lost(self, reason)

    # --- watching responses ----------------------------------------------------------------

    def _watch(self, data: bytes) -> None:
        if self.head_wait is not None:
            self._watch_head_response(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.pending and self.status == 101:
                self._answered(101)  # (if the parser did not say the message was complete)
            self.untracked = True  # 101 Switching Protocols: raw from here
            self.reusable = False
        except httptools.HttpParserError:
            self.untracked = True
            self.reusable = False

    def _watch_head_response(self, data: bytes) -> None:
        assert self.head_wait is not None
        self.head_wait += data
        end = self.head_wait.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head_wait) > MAX_RESPONSE_HEAD_BYTES:
                self.head_wait, self.untracked, self.reusable = None, True, False
            return
        head, rest = bytes(self.head_wait[:end]), bytes(self.head_wait[end + 4 :])
        code = head[9:12]
        if not head.startswith(b"HTTP/1.") or not code.isdigit():
            self.head_wait, self.untracked, self.reusable = None, True, False
            return
        if int(code) < 200:  # an interim response; the real one follows
            self.head_wait = bytearray()
            if rest:
                self._watch_head_response(rest)
            return
        self.head_wait = None
        self.parser = httptools.HttpResponseParser(self)
        if b"\r\nconnection: close" in head.lower():
            self.reusable = False
        self._answered(int(code))
        if rest and not self.untracked:
            self._watch(rest)

    def on_message_begin(self) -> None:
        if not self.pending:
            # A response nobody asked for (an origin writing past its own Content-Length):
            # whatever it holds must never reach the next client of this stream.
            self.untracked, self.reusable = True, False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        if self.status < 200 and self.status != 101:
            return  # 100 Continue and friends
        if not self.parser.should_keep_alive():
            self.reusable = False
        self._answered(self.status)

    def _answered(self, status: int) -> None:
        if not self.pending:
            self.untracked, self.reusable = True, False  # a response nobody asked for
            return
        if status == 101:
            self.pending.popleft()
            self.untracked, self.reusable = True, False
            self.proxy.stats.requests[(self.domain, 101)] += 1
            client = self.client
            if self.pending or client is None or not client.switch_protocols():
                self.close()  # switching with requests behind it, or unasked: never trusted
                if client is not None:
                    client.close()
            return
        self.pending.popleft()
        self.proxy.stats.requests[(self.domain, status)] += 1
        self.response_started = False
        if not self.pending and self.client is not None:
            self.client.upstream_idle()


def with_field(data: bytes, line: bytes, marker: bytes) -> bytes:
    """``data`` (the start of a response) with the field ``line`` added to its head, unless the
    head already has it (``marker``: ``b"\\r\\n"`` and its lower-case name) or does not
    arrive whole in this piece; interim (1xx) heads are passed over."""
    if not data.startswith(b"HTTP/1."):
        return data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    if data[9:10] == b"1":  # 1xx: the field goes on the final response
        return data[: end + 4] + with_field(data[end + 4 :], line, marker)
    if marker in data[:end].lower():
        return data
    return b"".join((data[: end + 2], line, data[end + 2 :]))


async def serve(
    proxy: HttpsProxy, front: ssl.SSLContext, host: str | None, port: int, reuse_port: bool = False
) -> Server:
    """Listen for TLS on ``host:port``; ``front`` picks each connection's certificate by SNI.
    ``reuse_port``: HTTPS worker processes listen on the same port."""
    return await asyncio.get_running_loop().create_server(
        proxy.tls_factory(front), host, port,
        backlog=4096, reuse_address=True, reuse_port=reuse_port or None,
    )  # fmt: skip
