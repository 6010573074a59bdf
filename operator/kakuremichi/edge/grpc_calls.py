"""gRPC calls routed one by one on a gateway: the hosts of GRPCRoutes with method or header
matches, several weighted backends or header edits.

The client's HTTP/2 ends here (``h2``, sans-IO). Each call (an HTTP/2 stream) is matched against
the host's rules as an HTTP request is (:mod:`kakuremichi.edge.request_routing`): its path is
``/service/method``, its headers the call's metadata. The calls a client sends to one backend
ride an HTTP/2 connection (h2c) of that client's own, over a stream to the cluster agent named by
the backend, which connects it to one of the backend's ready endpoints: no client's calls share a
connection with another's, and frames are made anew on each side (headers, data and trailers
pass; nothing else of either peer's HTTP/2 reaches the other).

Every client is hostile until checked:

- at most :data:`MAX_CALLS` calls at once (``SETTINGS_MAX_CONCURRENT_STREAMS``), header lists
  bounded by ``max_head_bytes``;
- a call's ``:authority`` must be the connection's host (421 otherwise): a client that reuses a
  connection for another name its certificate covers gets nothing from this host's rules;
- a connection whose client resets more than :data:`MAX_RESETS` calls within a second is
  closed (HTTP/2 "rapid reset");
- flow control runs end to end: bytes are acknowledged to their sender only once passed on, and
  nothing is passed to a side whose transport is not taking it, so a slow or stalled peer holds
  at most a window of the other's, never an unbounded buffer here;
- the client's ``X-Forwarded-*``, ``Forwarded`` and ``X-Real-IP`` are replaced by the
  gateway's own.

A call that no rule matches is answered ``UNIMPLEMENTED`` (as the Gateway API asks); a rule
share whose backend does not resolve, 500; a backend that cannot be reached, ``UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings

from kakuremichi.api.request_paths import PathRefused, normalize_path
from kakuremichi.api.resources import ClientLimits
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.mux import MuxDialer, MuxStream
from kakuremichi.edge.request_heads import address_field
from kakuremichi.edge.request_routing import Request
from kakuremichi.edge.stats import EdgeStats


class Client(Protocol):
    """The client's connection (``https_proxy.ClientConnection``), as calls see it."""

    transport: asyncio.Transport | None
    client_ip: bytes
    last_active: float

    def close(self) -> None: ...


class Gateway(Protocol):
    """The HTTPS proxy (``https_proxy.HttpsProxy``), as calls see it."""

    @property
    def stats(self) -> EdgeStats: ...
    @property
    def limits(self) -> ClientLimits: ...
    @property
    def routes(self) -> Mapping[str, GatewayRoute]: ...
    @property
    def dialer(self) -> MuxDialer: ...


MAX_CALLS = 100
"""Calls of one client connection at once."""
MAX_RESETS = 100
"""Calls a client may reset within a second before its connection is closed."""
MAX_UNREAD = 1 << 20
"""Bytes written to a client while its transport said to stop: calls' data waits then, so only
what HTTP/2 itself answers (PING, SETTINGS acknowledgements) can come to this."""
CONNECTION_WINDOW = 1 << 20
"""What a whole connection may have in flight toward the gateway (each call: 64 KiB)."""
GRPC_UNIMPLEMENTED, GRPC_UNAVAILABLE = 12, 14
log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]
_DATA, _HEADERS, _END = 0, 1, 2
Item = tuple[int, Any, int]
"""(_DATA, bytes, flow-controlled length to acknowledge once sent) | (_HEADERS, headers, 1 to end
the stream) | (_END, None, 0)."""


def pump(
    connection: H2Connection, stream_id: int, box: deque[Item], sent: Callable[[int], None]
) -> None:
    """Send what waits for ``stream_id`` in order, data as far as the peer's window allows;
    ``sent`` is told each data item's flow-controlled length once it is all out."""
    while box:
        kind, payload, extra = box[0]
        if kind == _DATA:
            room = min(
                connection.local_flow_control_window(stream_id),
                connection.max_outbound_frame_size,
            )
            if room <= 0 and payload:
                return
            chunk, rest = payload[:room], payload[room:]
            connection.send_data(stream_id, chunk)
            if rest:
                box[0] = (_DATA, rest, extra)
                continue
            box.popleft()
            sent(extra)
        elif kind == _HEADERS:
            connection.send_headers(stream_id, payload, end_stream=bool(extra))
            box.popleft()
        else:
            connection.end_stream(stream_id)
            box.popleft()


@dataclass(eq=False)
class Call:
    client_id: int
    link: BackendLink | None = None
    backend_id: int = 0
    to_backend: deque[Item] = field(default_factory=deque)
    to_client: deque[Item] = field(default_factory=deque)
    answered: bool = False
    """Response headers went (or go) to the client: a failure now resets the call."""
    upstream_open: bool = False
    """Routed, and the backend has not ended its side: what the client sends goes there."""


class CallRouter:
    """One client's HTTP/2 connection to a host whose calls are routed one by one."""

    def __init__(self, proxy: Gateway, client: Client, domain: str) -> None:
        self.proxy = proxy
        self.client = client
        self.domain = domain
        self.stats = proxy.stats
        config = H2Configuration(client_side=False, header_encoding=None)
        self.conn = H2Connection(config)
        self.conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CALLS,
            SettingCodes.MAX_HEADER_LIST_SIZE: proxy.limits.max_head_bytes,
            SettingCodes.ENABLE_PUSH: 0,
        })  # fmt: skip
        self.conn.decoder.max_header_list_size = proxy.limits.max_head_bytes
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.calls: dict[int, Call] = {}
        self.links: dict[str, BackendLink] = {}
        self.resets: deque[float] = deque()
        self.paused = False
        """The client's transport is not taking what is written: no call's data goes to it."""
        self.unread = 0
        """Bytes written since it paused."""
        self.closed = False
        self.flush()

    # --- from the client --------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as error:
            log.info("HTTP/2 of a client of %s refused: %s", self.domain, error)
            self.stats.errors["http2_protocol"] += 1
            self.flush()
            self.cut_off()
            return
        for event in events:
            self._client_event(event)
            if self.closed:
                return
        self.flush()

    def _client_event(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._start(event.stream_id, event.headers or [])
        elif isinstance(event, DataReceived):
            call = self.calls.get(event.stream_id)
            if call is None or call.link is None or not call.upstream_open:
                # (answered here, or the backend is done: its body is not wanted)
                self._acknowledge(event.flow_controlled_length, event.stream_id)
                return
            call.to_backend.append((_DATA, event.data or b"", event.flow_controlled_length))
            call.link.pump(call)
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None and call.link is not None and call.upstream_open:
                call.to_backend.append((_END, None, 0))
                call.link.pump(call)
            elif call is not None:
                self.pump(call)  # (forgotten once nothing is left to say)
        elif isinstance(event, StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, WindowUpdated):
            self.resume_calls(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            self.cut_off()

    def cut_off(self) -> None:
        """The connection ends here: nothing more of it is read, its calls go."""
        self.close()
        self.client.close()

    def _start(self, stream_id: int, headers: Sequence[Header]) -> None:
        pseudo = {name: value for name, value in headers if name.startswith(b":")}
        fields = [(name, value) for name, value in headers if not name.startswith(b":")]
        authority = pseudo.get(b":authority") or next(
            (value for name, value in fields if name == b"host"), b""
        )
        call = self.calls[stream_id] = Call(stream_id)
        if _host(authority) != self.domain:
            self._answer(call, 421, f"This connection is for {self.domain}.")
            return
        route = self.proxy.routes.get(self.domain)
        router = route.router if route is not None and route.serving else None
        if route is None or router is None or route.agent_ip is None:
            self._answer(call, 503, f"{self.domain} is not served here now.")
            return
        raw_path, mark, query = pseudo.get(b":path", b"").partition(b"?")
        try:  # (the path that chose the backend is the one it gets, as for HTTP requests)
            path = normalize_path(raw_path)
        except PathRefused as refusal:
            self._answer(call, 400, str(refusal))
            return
        method = pseudo.get(b":method", b"POST")
        lines = [name + b": " + value + b"\r\n" for name, value in fields]
        names = [name for name, _ in fields]
        choice = router.choose(Request(method, path, b"", lines, names))
        if choice is None:
            self._answer(call, 200, "No route of this host matches the call.", GRPC_UNIMPLEMENTED)
            return
        if choice.stream is None:
            self._answer(call, 500, "The route that matches this call has no backend.")
            return
        if choice.edits is not None:
            lines, names = choice.edits.apply(lines, names)
        client_ip = self.client.client_ip
        sent: list[Header] = [
            (b":method", method), (b":scheme", b"http"), (b":path", path + mark + query),
            (b":authority", authority),
            *(
                (name, line[len(name) + 2 : -2]) for line, name in zip(lines, names, strict=True)
                if not address_field(name) and name not in (b"host", b"forwarded")
            ),
            (b"x-forwarded-for", client_ip), (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", authority), (b"x-real-ip", client_ip),
        ]  # fmt: skip
        link = self.links.get(choice.stream)
        if link is None or link.closed:
            link = self.links[choice.stream] = BackendLink(self, choice.stream)
            self.proxy.dialer.open_stream(route.agent_ip, choice.stream, link)
        try:
            call.backend_id = link.conn.get_next_available_stream_id()
        except H2Error:
            self._answer(call, 200, "The backend takes no more calls now.", GRPC_UNAVAILABLE)
            return
        call.link, call.upstream_open = link, True
        link.calls[call.backend_id] = call
        call.to_backend.append((_HEADERS, sent, 0))
        link.pump(call)

    def _client_reset(self, stream_id: int) -> None:
        now = time.monotonic()
        self.resets.append(now)
        while self.resets and now - self.resets[0] > 1.0:
            self.resets.popleft()
        call = self.calls.pop(stream_id, None)
        if call is not None and call.link is not None and call.upstream_open:
            call.link.cancel(call)
        if len(self.resets) > MAX_RESETS:
            self.stats.limit_hits["http2_resets"] += 1
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self.flush()
            self.cut_off()

    # --- toward the client ------------------------------------------------------------------

    def _answer(self, call: Call, status: int, message: str, grpc: int | None = None) -> None:
        """A call answered here, with no body: a gRPC status in trailers-only form, or an HTTP
        status."""
        if grpc is not None:
            headers: list[Header] = [
                (b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", str(grpc).encode()),
                (b"grpc-message", quote(message, safe=" ").encode()),
            ]  # fmt: skip
        else:
            headers = [(b":status", str(status).encode()), (b"content-type", b"text/plain")]
        self.stats.requests[(self.domain, status)] += 1
        call.answered = True
        call.to_client.append((_HEADERS, headers, 1))
        self.pump(call)

    def fail(self, call: Call, message: str) -> None:
        """The backend is gone: UNAVAILABLE, or the call reset once its answer began."""
        if call.link is not None:
            call.link.calls.pop(call.backend_id, None)
        call.upstream_open = False
        call.to_backend.clear()
        if call.answered:
            call.to_client.clear()
            self.calls.pop(call.client_id, None)
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(call.client_id, ErrorCodes.CANCEL)
        else:
            self._answer(call, 200, message, GRPC_UNAVAILABLE)

    def pump(self, call: Call) -> None:
        if self.paused or self.closed:
            return
        try:
            pump(self.conn, call.client_id, call.to_client, self._backend_acknowledge(call))
        except H2Error:
            call.to_client.clear()  # (the client closed or reset that call meanwhile)
        if not call.to_client and not call.upstream_open and self._finished(call.client_id):
            self.calls.pop(call.client_id, None)

    def _backend_acknowledge(self, call: Call) -> Callable[[int], None]:
        link = call.link
        if link is None:
            return _ignore
        return lambda size: link.acknowledge(size, call.backend_id)

    def _finished(self, stream_id: int) -> bool:
        try:
            return bool(self.conn._get_stream_by_id(stream_id).closed)
        except H2Error:
            return True

    def resume_calls(self, stream_id: int = 0) -> None:
        """The client's window opened (``stream_id`` 0: the connection's)."""
        for call in _of(self.calls, stream_id):
            self.pump(call)
        self.flush()

    def _acknowledge(self, size: int, stream_id: int) -> None:
        with contextlib.suppress(H2Error):
            self.conn.acknowledge_received_data(size, stream_id)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.client.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self.client.last_active = time.monotonic()
            if self.paused:
                self.unread += len(data)
                if self.unread > MAX_UNREAD:
                    # (a client that sends PINGs or SETTINGS and never reads their answers)
                    self.stats.limit_hits["http2_unread"] += 1
                    self.cut_off()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused, self.unread = False, 0
        self.resume_calls()

    def close(self) -> None:
        """The client is gone: every backend connection of its goes too."""
        self.closed = True
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        self.calls.clear()


class BackendLink(asyncio.Protocol):
    """An HTTP/2 connection (h2c) to one backend for one client's calls, over a stream to the
    agent named by the backend."""

    def __init__(self, router: CallRouter, stream: str) -> None:
        self.router = router
        self.stream = stream
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_HEADER_LIST_SIZE: router.proxy.limits.max_head_bytes,
        })  # fmt: skip
        self.conn.initiate_connection()
        self.calls: dict[int, Call] = {}
        self.transport: MuxStream | None = None
        self.paused = False
        self.closed = False

    def pump(self, call: Call) -> None:
        if self.paused or self.closed:
            return
        try:
            pump(self.conn, call.backend_id, call.to_backend, self._client_acknowledge(call))
        except H2Error:
            call.to_backend.clear()  # (the backend reset that call: its answer says so)
        self.flush()
        self.router.flush()

    def _client_acknowledge(self, call: Call) -> Callable[[int], None]:
        return lambda size: self.router._acknowledge(size, call.client_id)

    def acknowledge(self, size: int, stream_id: int) -> None:
        with contextlib.suppress(H2Error):
            self.conn.acknowledge_received_data(size, stream_id)
        self.flush()

    def cancel(self, call: Call) -> None:
        """The client reset the call."""
        self.calls.pop(call.backend_id, None)
        call.upstream_open = False
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(call.backend_id, ErrorCodes.CANCEL)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # --- transport callbacks ----------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(MuxStream, base)
        self.flush()

    def data_received(self, data: bytes) -> None:
        router = self.router
        router.stats.sent_bytes[router.domain] += len(data)
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as error:  # (e.g. the agent's 503 for a backend with no endpoint)
            log.info("backend %s of %s: %s", self.stream, router.domain, error)
            router.stats.errors["backend_http2"] += 1
            self._lost("The backend is not reachable.")
            return
        for event in events:
            self._event(event)
        self.flush()
        router.flush()

    def _event(self, event: Event) -> None:
        router = self.router
        stream_id = getattr(event, "stream_id", 0)
        call = self.calls.get(stream_id)
        if isinstance(event, ResponseReceived) and call is not None:
            headers = list(event.headers or [])
            status = next((v for n, v in headers if n == b":status"), b"0")
            router.stats.requests[(router.domain, int(status) if status.isdigit() else 0)] += 1
            call.answered = True
            call.to_client.append((_HEADERS, headers, 0))
            router.pump(call)
        elif isinstance(event, DataReceived):
            if call is None:
                self.acknowledge(event.flow_controlled_length, stream_id)
                return
            call.to_client.append((_DATA, event.data or b"", event.flow_controlled_length))
            router.pump(call)
        elif isinstance(event, TrailersReceived) and call is not None:
            call.to_client.append((_HEADERS, list(event.headers or []), 1))
            self._done(call)
        elif isinstance(event, StreamEnded) and call is not None:
            if call.upstream_open:  # (not already ended by its trailers)
                call.to_client.append((_END, None, 0))
                self._done(call)
        elif isinstance(event, StreamReset) and call is not None:
            router.fail(call, "The backend reset the call.")
            router.flush()
        elif isinstance(event, WindowUpdated):
            for waiting in _of(self.calls, stream_id):
                self.pump(waiting)
        elif isinstance(event, ConnectionTerminated):
            last = event.last_stream_id or 0
            for backend_id, gone in list(self.calls.items()):
                if backend_id > last:
                    router.fail(gone, "The backend is going away.")
            self.closed = True  # (no new call comes here: the next gets a new connection)

    def _done(self, call: Call) -> None:
        """The backend ended its side of the call."""
        self.calls.pop(call.backend_id, None)
        call.upstream_open = False
        call.to_backend.clear()
        self.router.pump(call)

    def _lost(self, message: str) -> None:
        self.close()
        for call in list(self.calls.values()):
            self.router.fail(call, message)
        self.calls.clear()
        self.router.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.calls:
            self._lost("The backend closed the connection.")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.calls.values()):
            self.pump(call)


def _of(calls: dict[int, Call], stream_id: int) -> Iterable[Call]:
    if stream_id == 0:
        return list(calls.values())
    found = calls.get(stream_id)
    return [found] if found is not None else []


def _host(authority: bytes) -> str:
    """The host of ``:authority``, lower case, without a port."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.rpartition(":")[0] if ":" in text else text


def _ignore(size: int) -> None:
    pass
