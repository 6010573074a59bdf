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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
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
"""What a whole connection may have in flight toward the gateway, each way (a call: 64 KiB, so
a few calls whose reader stalls never hold up the others)."""
GRPC_UNIMPLEMENTED, GRPC_UNAVAILABLE = 12, 14
log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]


@dataclass(slots=True)
class Outbox:
    """What waits to go out on one stream of one HTTP/2 connection, in order: data (sent as
    far as the peer's window allows; consecutive data kept as one buffer, so empty or tiny
    frames cost nothing) and headers, the last of them perhaps ending the stream."""

    items: deque[tuple[bytes, list[Header] | None, bool, int]] = field(default_factory=deque)
    """(data, headers, end, flow-controlled length of that data to acknowledge once sent)."""

    def data(self, data: bytes, length: int) -> None:
        if self.items and self.items[-1][1] is None and not self.items[-1][2]:
            last, _, _, known = self.items[-1]
            self.items[-1] = (last + data, None, False, known + length)
        else:
            self.items.append((data, None, False, length))

    def headers(self, headers: list[Header], end: bool) -> None:
        self.items.append((b"", headers, end, 0))

    def end(self) -> None:
        self.items.append((b"", None, True, 0))

    def send(self, connection: H2Connection, stream_id: int, sent: Callable[[int], None]) -> bool:
        """Send what the peer's window allows; ``sent`` is told the flow-controlled length of
        what went out. Whether something is left waiting for the window."""
        items = self.items
        while items:
            data, headers, end, length = items[0]
            if headers is not None:
                connection.send_headers(stream_id, headers, end_stream=end)
                items.popleft()
                continue
            if data:
                room = min(
                    connection.local_flow_control_window(stream_id),
                    connection.max_outbound_frame_size,
                )
                if room <= 0:
                    return True
                if len(data) > room:
                    connection.send_data(stream_id, data[:room])
                    items[0] = (data[room:], None, end, length)
                    continue
                connection.send_data(stream_id, data, end_stream=end)
            elif end:
                connection.end_stream(stream_id)
            items.popleft()
            sent(length)
        return False

    def drop(self, acknowledge: Callable[[int], None]) -> None:
        """Nothing more goes out: what was received for it is acknowledged all the same (else
        the sender's window would shrink for good)."""
        acknowledge(sum(item[3] for item in self.items))
        self.items.clear()

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(eq=False)
class Call:
    client_id: int
    link: BackendLink | None = None
    backend_id: int = 0
    to_backend: Outbox = field(default_factory=Outbox)
    to_client: Outbox = field(default_factory=Outbox)
    answered: bool = False
    """Response headers went (or go) to the client: a failure now resets the call."""
    upstream_open: bool = False
    """Routed, and the backend has not ended its side: what the client sends goes there."""
    client_ended: bool = False
    """The client ended its side (or reset the call)."""
    ended: bool = False
    """The end of the answer is queued for the client."""


class CallRouter:
    """One client's HTTP/2 connection to a host whose calls are routed one by one."""

    def __init__(self, proxy: Gateway, client: Client, domain: str) -> None:
        self.proxy = proxy
        self.client = client
        self.domain = domain
        self.stats = proxy.stats
        self.conn = _connection(client_side=False, header_limit=proxy.limits.max_head_bytes)
        self.calls: dict[int, Call] = {}
        self.links: dict[tuple[str, str], BackendLink] = {}
        """(agent address, backend stream) → this client's connection to that backend."""
        self.blocked: set[Call] = set()
        """Calls whose answer waits for the client's window."""
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
            length = event.flow_controlled_length
            if call is None or not call.upstream_open or call.link is None:
                # (answered here, or the backend is done: its body is not wanted)
                self.acknowledge(length, event.stream_id)
            elif not event.data:
                self.acknowledge(length, event.stream_id)  # (padding only: nothing to pass)
            else:
                call.to_backend.data(event.data, length)
                call.link.pump(call)
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.client_ended = True
                if call.link is not None and call.upstream_open:
                    call.to_backend.end()
                    call.link.pump(call)
                else:
                    self.pump(call)  # (forgotten once nothing is left to say)
        elif isinstance(event, StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, WindowUpdated):
            self.resume_calls(event.stream_id)
        elif isinstance(event, RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self.resume_calls(every=True)
        elif isinstance(event, ConnectionTerminated):
            self.cut_off()

    def cut_off(self) -> None:
        """The connection ends here: nothing more of it is read, its calls go."""
        self.close()
        self.client.close()

    def _start(self, stream_id: int, headers: Sequence[Header]) -> None:
        pseudo = {name: value for name, value in headers if name.startswith(b":")}
        # (what names the client's address is the gateway's to say: never matched on, never
        # passed on)
        fields = [
            (name, value) for name, value in headers
            if not name.startswith(b":") and not address_field(name)
            and name not in (b"host", b"forwarded")
        ]  # fmt: skip
        authority = pseudo.get(b":authority") or next(
            (value for name, value in headers if name == b"host"), b""
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
            *((name, line[len(name) + 2 : -2]) for line, name in zip(lines, names, strict=True)),
            (b"x-forwarded-for", client_ip), (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", authority), (b"x-real-ip", client_ip),
        ]  # fmt: skip
        link = self._link(route.agent_ip, choice.stream)
        backend_id = link.start(sent)
        if backend_id is None:
            self._answer(call, 200, "The backend takes no more calls now.", GRPC_UNAVAILABLE)
            return
        call.link, call.backend_id, call.upstream_open = link, backend_id, True
        link.calls[backend_id] = call

    def _link(self, agent_ip: str, stream: str) -> BackendLink:
        """This client's connection to ``stream`` through the agent the host goes to now (one
        to an agent the host left takes no new call, and goes once its calls are done)."""
        for key, old in list(self.links.items()):
            if (key[0] != agent_ip or old.closed) and not old.calls:
                old.close()
                del self.links[key]
        key = (agent_ip, stream)
        link = self.links.get(key)
        if link is None or link.closed:
            link = self.links[key] = BackendLink(self, stream)
            self.proxy.dialer.open_stream(agent_ip, stream, link)
        return link

    def _client_reset(self, stream_id: int) -> None:
        now = time.monotonic()
        self.resets.append(now)
        while self.resets and now - self.resets[0] > 1.0:
            self.resets.popleft()
        call = self.calls.pop(stream_id, None)
        if call is not None:
            self.blocked.discard(call)
            call.client_ended = True
            call.to_client.drop(self._backend_acknowledge(call))
            call.to_backend.drop(lambda size: self.acknowledge(size, stream_id))
            if call.link is not None and call.upstream_open:
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
        call.answered = call.ended = True
        call.to_client.headers(headers, end=True)
        self.pump(call)

    def answer_from_backend(self, call: Call, headers: list[Header], end: bool) -> None:
        status = next((v for n, v in headers if n == b":status"), b"0")
        self.stats.requests[(self.domain, int(status) if status.isdigit() else 0)] += 1
        call.answered = True
        call.ended = call.ended or end
        call.to_client.headers(headers, end)
        self.pump(call)

    def fail(self, call: Call, message: str) -> None:
        """The backend is gone: UNAVAILABLE, or the call reset once its answer began."""
        if call.link is not None:
            call.link.calls.pop(call.backend_id, None)
        call.upstream_open = False
        call.to_backend.drop(lambda size: self.acknowledge(size, call.client_id))
        if not call.answered:
            self._answer(call, 200, message, GRPC_UNAVAILABLE)
            return
        call.to_client.drop(self._backend_acknowledge(call))
        self._forget(call)
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(call.client_id, ErrorCodes.CANCEL)

    def pump(self, call: Call) -> None:
        if self.closed or call.client_id not in self.calls:
            return
        if self.paused:
            self.blocked.add(call)
            return
        try:
            waiting = call.to_client.send(self.conn, call.client_id,
                                          self._backend_acknowledge(call))  # fmt: skip
        except H2Error:  # (the client closed or reset that call meanwhile)
            call.to_client.drop(self._backend_acknowledge(call))
            waiting = False
        if waiting:
            self.blocked.add(call)
        else:
            self.blocked.discard(call)
        if not call.to_client and call.ended and not call.upstream_open:
            self._forget(call)
            if not call.client_ended:
                # (answered in full while the client still sends: it may stop, RFC 9113 8.1)
                with contextlib.suppress(H2Error):
                    self.conn.reset_stream(call.client_id, ErrorCodes.NO_ERROR)

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.client_id, None)
        self.blocked.discard(call)

    def _backend_acknowledge(self, call: Call) -> Callable[[int], None]:
        link = call.link
        if link is None:
            return _ignore
        return lambda size: link.acknowledge(size, call.backend_id)

    def resume_calls(self, stream_id: int = 0, every: bool = False) -> None:
        """The client's window opened (``stream_id`` 0: the connection's; ``every``: each
        call's, by SETTINGS)."""
        if stream_id:
            found = self.calls.get(stream_id)
            waiting = [found] if found is not None else []
        else:
            waiting = list(self.calls.values() if every else self.blocked)
        for call in waiting:
            self.pump(call)
        self.flush()

    def acknowledge(self, size: int, stream_id: int) -> None:
        if size:
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
        self.blocked.clear()


class BackendLink(asyncio.Protocol):
    """An HTTP/2 connection (h2c) to one backend for one client's calls, over a stream to the
    agent named by the backend."""

    def __init__(self, router: CallRouter, stream: str) -> None:
        self.router = router
        self.stream = stream
        self.conn = _connection(client_side=True, header_limit=router.proxy.limits.max_head_bytes)
        self.calls: dict[int, Call] = {}
        self.blocked: set[Call] = set()
        """Calls whose request body waits for the backend's window."""
        self.transport: MuxStream | None = None
        self.paused = False
        self.closed = False
        """No new call goes here (lost, or the backend said GOAWAY)."""

    def start(self, headers: list[Header]) -> int | None:
        """A new call's headers sent at once (they are not flow-controlled); its stream id, or
        None when the backend takes no more calls now."""
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, headers)
        except H2Error:
            return None
        self.flush()
        return stream_id

    def pump(self, call: Call) -> None:
        if self.closed:
            return
        if self.paused:
            self.blocked.add(call)
            return
        acknowledge = self._client_acknowledge(call)
        try:
            waiting = call.to_backend.send(self.conn, call.backend_id, acknowledge)
        except H2Error:  # (the backend reset that call: its answer says so)
            call.to_backend.drop(acknowledge)
            waiting = False
        if waiting:
            self.blocked.add(call)
        else:
            self.blocked.discard(call)
        self.flush()
        self.router.flush()

    def _client_acknowledge(self, call: Call) -> Callable[[int], None]:
        return lambda size: self.router.acknowledge(size, call.client_id)

    def acknowledge(self, size: int, stream_id: int) -> None:
        if size:
            with contextlib.suppress(H2Error):
                self.conn.acknowledge_received_data(size, stream_id)
            self.flush()

    def cancel(self, call: Call) -> None:
        """The client reset the call."""
        self.calls.pop(call.backend_id, None)
        self.blocked.discard(call)
        call.upstream_open = False
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(call.backend_id, ErrorCodes.CANCEL)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
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
            if event.stream_ended is not None:  # (trailers-only: a gRPC status, most often)
                self._done(call)
            router.answer_from_backend(call, headers, end=event.stream_ended is not None)
        elif isinstance(event, DataReceived):
            length = event.flow_controlled_length
            if call is None or not event.data:
                self.acknowledge(length, stream_id)
                return
            call.to_client.data(event.data, length)
            router.pump(call)
        elif isinstance(event, TrailersReceived) and call is not None:
            self._done(call)
            call.ended = True
            call.to_client.headers(list(event.headers or []), end=True)
            router.pump(call)
        elif isinstance(event, StreamEnded) and call is not None:
            self._done(call)  # (a response without trailers)
            call.ended = True
            call.to_client.end()
            router.pump(call)
        elif isinstance(event, StreamReset) and call is not None:
            router.fail(call, "The backend reset the call.")
        elif isinstance(event, WindowUpdated):
            waiting = ([call] if call is not None else []) if stream_id else list(self.blocked)
            for one in waiting:
                self.pump(one)
        elif isinstance(event, RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for one in list(self.calls.values()):
                    self.pump(one)
        elif isinstance(event, ConnectionTerminated):
            # A GOAWAY: this connection reads nothing more (the library closes it), so the
            # calls on it end now, retryable (UNAVAILABLE before an answer began).
            self._lost("The backend is going away.")

    def _done(self, call: Call) -> None:
        """The backend ended its side of the call: what the client still sends is not wanted."""
        self.calls.pop(call.backend_id, None)
        self.blocked.discard(call)
        call.upstream_open = False
        call.to_backend.drop(self._client_acknowledge(call))

    def _lost(self, message: str) -> None:
        self.close()
        calls, self.calls = list(self.calls.values()), {}
        self.blocked.clear()
        for call in calls:
            self.router.fail(call, message)
        self.router.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.calls:
            self._lost("The backend closed the connection.")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.blocked):
            self.pump(call)


def _connection(client_side: bool, header_limit: int) -> H2Connection:
    """An HTTP/2 connection of ours: header lists bounded, no server push, a connection
    window of :data:`CONNECTION_WINDOW`."""
    connection = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
    initial = {SettingCodes.MAX_HEADER_LIST_SIZE: header_limit, SettingCodes.ENABLE_PUSH: 0}
    if not client_side:
        initial[SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CALLS
    connection.local_settings = Settings(client=client_side, initial_values=initial)
    connection.decoder.max_header_list_size = header_limit
    connection.initiate_connection()
    connection.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    return connection


def _host(authority: bytes) -> str:
    """The host of ``:authority``, lower case, without a port."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.rpartition(":")[0] if ":" in text else text


def _ignore(size: int) -> None:
    pass
