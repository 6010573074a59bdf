"""Many tunnel streams over one TCP connection between a gateway and an agent.

Why: with a connection per upstream request chain, every request and every response is its own
TCP segment, WireGuard packet and pair of syscalls on both ends. Over one connection, whatever a
gateway or an agent has to send in one turn of its event loop leaves in one vectored write, so
under load many requests share segments, packets and syscalls (issue 8: they are what the
routed WireGuard path pays per request). Streams behave like asyncio transports toward the
protocols above them, so the HTTPS proxy and the agent's relay do not deal in frames.

Wire format: the gateway (the only side that opens streams) starts with :data:`HELLO`; then both
sides send frames: a 9-byte header (kind, stream id, payload length; network byte order) and the
payload. Each direction of each stream has a credit window: a side sends at most
:data:`WINDOW_BYTES` the other has not yet handed on, and WINDOW frames return credit. So a slow
reader stops only its own stream, never the others on the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

HELLO = b"KAKUREMICHI/2 mux\r\n"
HEADER = struct.Struct("!BII")
OPEN, DATA, EOF, CLOSE, WINDOW = 1, 2, 3, 4, 5
WINDOW_BYTES = 2 * 1024 * 1024
"""Per stream and direction: bytes in flight or buffered at the receiver, at most. It caps one
stream's throughput at WINDOW_BYTES per round trip (about 550 Mbit/s at 30 ms) and what a slow
client can make its gateway hold for it."""
MAX_FRAME_BYTES = 64 * 1024
"""A receiver hands a frame on only once it is complete: frames much smaller than the window
keep credit flowing back while the rest of the window is still on the way."""
CREDIT_BATCH = 64 * 1024
"""Credit goes back in batches of at least this (one WINDOW frame per 64 KiB handed on)."""
OUTBOX_HIGH_WATER = 64 * 1024
"""Bytes a stream holds for lack of credit before it asks its writer to pause."""
MAX_NAME_BYTES = 512
"""What a stream is opened naming: its tunnel's domain, and maybe the client's address
(:mod:`kakuremichi.edge.stream_names`)."""
MAX_STREAMS = 65536
LAST_STREAM_ID = 0xFFFFFFFF
HELLO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
SILENCE_MS = 5000
"""Data to the peer unacknowledged this long: the connection is dead (TCP_USER_TIMEOUT)."""
log = logging.getLogger(__name__)

Accept = Callable[[str], asyncio.Protocol]
"""The listener's factory: the protocol for a new stream of the given tunnel (domain)."""


class MuxError(Exception):
    """The peer broke the framing rules; the whole connection is closed."""


class PeerUnreachable(ConnectionError):
    """The connection a stream was opened on could not be established."""


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream_id, len(payload)) + payload


class MuxStream:
    """One stream: the subset of :class:`asyncio.Transport` the proxies use, plus the
    callbacks the connection drives. Its protocol sees the usual protocol callbacks."""

    __slots__ = (
        "closed",
        "closing",
        "connection",
        "credit",
        "eof_sent",
        "eof_wanted",
        "handed_on",
        "id",
        "inbox",
        "inbox_eof",
        "on_existing_connection",
        "outbox",
        "outbox_bytes",
        "protocol",
        "reading_paused",
        "receivable",
        "writing_paused",
    )  # fmt: skip

    def __init__(self, connection: MuxConnection, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.protocol: asyncio.Protocol | None = None
        self.credit = WINDOW_BYTES
        """Bytes we may still send before the peer returns credit."""
        self.receivable = WINDOW_BYTES
        """Bytes the peer may still send before we return credit."""
        self.handed_on = 0
        """Received, handed to our protocol, not yet returned as credit."""
        self.outbox: list[bytes | memoryview] = []
        self.outbox_bytes = 0
        self.inbox: list[bytes] = []
        self.inbox_eof = False
        self.reading_paused = False
        self.writing_paused = False
        self.closing = False
        self.closed = False
        self.eof_wanted = False
        self.eof_sent = False
        self.on_existing_connection = connection.streams_opened > 0
        """The connection carried streams before (it may have died unnoticed since)."""

    # --- transport API ---------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.eof_wanted or not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # callers may reuse their buffer; frames wait for the flush
        if not self.outbox and len(data) <= self.credit and len(data) <= MAX_FRAME_BYTES:
            self.credit -= len(data)
            self.connection.send(DATA, self.id, data)
            return
        self.outbox.append(data)
        self.outbox_bytes += len(data)
        self._drain()

    def write_eof(self) -> None:
        if self.closing or self.eof_wanted:
            return
        self.eof_wanted = True
        self._drain()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Send what is held back, then close the stream (both directions)."""
        if self.closing:
            return
        self.closing = True
        self._drain()

    def abort(self) -> None:
        self._finish(None, tell_peer=True)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        inbox, self.inbox = self.inbox, []
        for index, payload in enumerate(inbox):
            if self.closed:
                return
            if self.reading_paused:  # paused again by what it handed on
                self.inbox = inbox[index:] + self.inbox
                return
            self._hand_on(payload)
        if self.inbox_eof and not self.closed and not self.reading_paused:
            self.inbox_eof = False
            self._eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname") and self.connection.transport is not None:
            return self.connection.transport.get_extra_info(name, default)
        return default

    # --- driven by the connection ----------------------------------------------------------

    def update_writing(self) -> None:
        """Pause the writer while this stream or the whole connection is backed up."""
        blocked = self.outbox_bytes > OUTBOX_HIGH_WATER or self.connection.writing_blocked
        if blocked != self.writing_paused and not self.closed and self.protocol is not None:
            self.writing_paused = blocked
            if blocked:
                self.protocol.pause_writing()
            else:
                self.protocol.resume_writing()

    def received(self, payload: bytes) -> None:
        if len(payload) > self.receivable:
            raise MuxError(f"stream {self.id} sent beyond its window")
        self.receivable -= len(payload)
        if self.closing:
            self._credit(len(payload))  # closing: nobody reads any more
        elif self.reading_paused or self.inbox:
            self.inbox.append(payload)
        else:
            self._hand_on(payload)

    def received_eof(self) -> None:
        if self.reading_paused or self.inbox:
            self.inbox_eof = True
        else:
            self._eof()

    def received_credit(self, amount: int) -> None:
        self.credit += amount
        self._drain()

    def lost(self, exc: Exception | None) -> None:
        self._finish(exc, tell_peer=False)

    # --- internals -------------------------------------------------------------------------

    def _hand_on(self, payload: bytes) -> None:
        assert self.protocol is not None
        self.protocol.data_received(payload)
        self._credit(len(payload))

    def _credit(self, amount: int) -> None:
        self.handed_on += amount
        if self.handed_on >= CREDIT_BATCH and not self.closed:
            self.receivable += self.handed_on
            self.connection.send(WINDOW, self.id, self.handed_on.to_bytes(4, "big"))
            self.handed_on = 0

    def _eof(self) -> None:
        if self.closing:
            return
        assert self.protocol is not None
        if not self.protocol.eof_received():
            self.close()

    def _drain(self) -> None:
        if self.closed:
            return
        outbox = self.outbox
        while outbox and self.credit > 0:
            data = outbox[0]
            size = min(len(data), self.credit, MAX_FRAME_BYTES)
            if size == len(data):
                outbox.pop(0)
                piece: bytes | memoryview = data
            else:
                view = memoryview(data)
                piece, outbox[0] = view[:size], view[size:]
            self.credit -= size
            self.outbox_bytes -= size
            self.connection.send(DATA, self.id, piece)
        if self.outbox:
            self.update_writing()
            return
        if self.eof_wanted and not self.eof_sent:
            self.eof_sent = True
            self.connection.send(EOF, self.id)
        if self.closing:
            self._finish(None, tell_peer=True)
        else:
            self.update_writing()

    def _finish(self, exc: Exception | None, tell_peer: bool) -> None:
        if self.closed:
            return
        self.closed = self.closing = True
        self.outbox, self.inbox, self.outbox_bytes = [], [], 0
        self.connection.forget(self, tell_peer)
        if self.protocol is not None:
            self.connection.loop.call_soon(self.protocol.connection_lost, exc)


class MuxConnection(asyncio.Protocol):
    """One TCP connection carrying streams. A gateway dials (``accept`` is None) and opens
    streams; an agent listens and gets each new stream's protocol from ``accept``."""

    def __init__(
        self, accept: Accept | None = None, on_lost: Callable[[MuxConnection], None] | None = None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.accept = accept
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, MuxStream] = {}
        self.streams_opened = 0
        self.next_id = 1
        self.frames: list[bytes | memoryview] = [] if accept is not None else [HELLO]
        self.flush_handle: asyncio.Handle | None = None
        self.buffer = bytearray()
        self.awaiting_hello = accept is not None
        self.hello_timer: asyncio.TimerHandle | None = None
        self.writing_blocked = False
        self.is_lost = False
        self.draining = False
        """No new streams: ids are used up, or the connection is being retired."""

    # --- opening streams (dialer) ----------------------------------------------------------

    async def connect(self, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.loop.create_connection(lambda: self, host, port)
        except (OSError, TimeoutError) as error:
            log.info("cannot reach %s:%d: %s", host, port, error or "timeout")
            self._lost(PeerUnreachable(f"{host}:{port}: {error or 'timeout'}"))

    def open_stream(self, domain: str, protocol: asyncio.Protocol) -> MuxStream:
        """A new stream toward ``domain``'s tunnel; usable at once (data waits for the
        connection if it is still being made)."""
        assert self.accept is None, "only the dialing side opens streams"
        assert not self.draining, "a retired connection opens no streams"
        stream = MuxStream(self, self.next_id)
        stream.protocol = protocol
        self.streams[stream.id] = stream
        self.streams_opened += 1
        self.next_id += 1
        if self.next_id > LAST_STREAM_ID:
            self.draining = True
        self.send(OPEN, stream.id, domain.encode("ascii"))
        protocol.connection_made(cast(asyncio.Transport, stream))
        return stream

    def retire(self) -> None:
        """Open no more streams here; close once the open ones are done."""
        self.draining = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        elif not self.is_lost:
            self._lost(None)

    # --- sending ---------------------------------------------------------------------------

    def send(self, kind: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        if self.is_lost:
            return
        self.frames.append(HEADER.pack(kind, stream_id, len(payload)))
        if payload:
            self.frames.append(payload)
        if self.flush_handle is None and self.transport is not None:
            self.flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Everything sent during this turn of the loop leaves in one write."""
        self.flush_handle = None
        if self.frames and self.transport is not None and not self.is_lost:
            frames, self.frames = self.frames, []
            self.transport.writelines(frames)

    def forget(self, stream: MuxStream, tell_peer: bool) -> None:
        if self.streams.pop(stream.id, None) is not None and tell_peer:
            self.send(CLOSE, stream.id)
        if self.draining and not self.streams and self.accept is None:
            self.flush()
            self.close()

    # --- transport callbacks ---------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        if self.is_lost:
            transport.close()
            return
        self.transport = transport
        _fail_fast(transport)
        if self.awaiting_hello:
            self.hello_timer = self.loop.call_later(HELLO_TIMEOUT, self.close)
        if self.frames:
            self.flush()

    def data_received(self, data: bytes) -> None:
        if self.buffer:  # the rest of a frame: join once, then parse from immutable bytes
            self.buffer += data
            data = bytes(self.buffer)
            self.buffer = bytearray()
        try:
            if self.awaiting_hello:
                self.buffer += data
                if not self._read_hello():
                    return
                data, self.buffer = bytes(self.buffer), bytearray()
            offset, end = 0, len(data)
            while end - offset >= HEADER.size and not self.is_lost:
                kind, stream_id, length = HEADER.unpack_from(data, offset)
                if length > MAX_FRAME_BYTES:
                    raise MuxError(f"a frame of {length} bytes")
                start = offset + HEADER.size
                if end - start < length:
                    break
                offset = start + length
                self._dispatch(kind, stream_id, data[start:offset])
            if offset < end and not self.is_lost:
                self.buffer = bytearray(data[offset:])
        except MuxError as error:
            log.warning("closing a tunnel connection: %s", error)
            self.buffer = bytearray()
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def pause_writing(self) -> None:
        self._set_blocked(True)

    def resume_writing(self) -> None:
        self._set_blocked(False)

    # --- internals -------------------------------------------------------------------------

    def _read_hello(self) -> bool:
        buffer = self.buffer
        if len(buffer) < len(HELLO):
            if not HELLO.startswith(buffer):
                raise MuxError("not a kakuremichi tunnel connection")
            return False
        if not buffer.startswith(HELLO):
            raise MuxError("not a kakuremichi tunnel connection")
        del buffer[: len(HELLO)]
        self.awaiting_hello = False
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        return True

    def _dispatch(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == OPEN:
            self._accept(stream_id, payload)
            return
        stream = self.streams.get(stream_id)
        if kind == DATA:
            if stream is not None:
                stream.received(payload)
        elif kind == WINDOW:
            if len(payload) != 4:
                raise MuxError("a malformed WINDOW frame")
            if stream is not None:
                stream.received_credit(int.from_bytes(payload, "big"))
        elif kind == EOF:
            if stream is not None:
                stream.received_eof()
        elif kind == CLOSE:
            if stream is not None:
                stream.lost(None)
        else:
            raise MuxError(f"an unknown frame kind {kind}")

    def _accept(self, stream_id: int, payload: bytes) -> None:
        if self.accept is None:
            raise MuxError("the agent side may not open streams")
        if stream_id == 0 or stream_id in self.streams:
            raise MuxError(f"stream {stream_id} opened twice")
        try:
            domain = payload.decode("ascii")
        except UnicodeDecodeError:
            raise MuxError("a stream name that is not ASCII") from None
        if not domain or len(payload) > MAX_NAME_BYTES or any(c.isspace() for c in domain):
            raise MuxError("a malformed stream name")
        if len(self.streams) >= MAX_STREAMS:
            self.send(CLOSE, stream_id)
            return
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        protocol = self.accept(domain.lower())
        stream.protocol = protocol
        protocol.connection_made(cast(asyncio.Transport, stream))

    def _set_blocked(self, blocked: bool) -> None:
        self.writing_blocked = blocked
        for stream in list(self.streams.values()):
            stream.update_writing()

    def _lost(self, exc: Exception | None) -> None:
        if self.is_lost:
            return
        self.is_lost = True
        self.frames = []
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        for stream in list(self.streams.values()):
            stream.lost(exc)
        self.streams.clear()
        if self.on_lost is not None:
            self.on_lost(self)


class MuxDialer:
    """A gateway's connections to agents: one per agent address, made on first use and again
    after it is lost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections: dict[str, MuxConnection] = {}

    def open_stream(self, host: str, domain: str, protocol: asyncio.Protocol) -> MuxStream:
        connection = self.connections.get(host)
        if connection is None or connection.is_lost or connection.draining:
            if connection is not None and not connection.is_lost:
                connection.retire()
            connection = MuxConnection(on_lost=self._lost)
            self.connections[host] = connection
            connection.loop.create_task(connection.connect(host, self.port))
        return connection.open_stream(domain, protocol)

    def keep_only(self, hosts: set[str]) -> None:
        """Retire the connections to agents no tunnel goes to any more."""
        for host, connection in list(self.connections.items()):
            if host not in hosts:
                del self.connections[host]
                connection.retire()

    def close_all(self) -> None:
        for connection in list(self.connections.values()):
            connection.close()
        self.connections.clear()

    def _lost(self, connection: MuxConnection) -> None:
        for host, known in list(self.connections.items()):
            if known is connection:
                del self.connections[host]


def _fail_fast(transport: asyncio.Transport) -> None:
    """A peer that vanishes (killed, its WireGuard gone) sends no reset: notice within seconds,
    with requests in flight (unacknowledged data) and on an idle connection (keepalive)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SILENCE_MS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
    except (OSError, AttributeError):  # not Linux: response timeouts still bound it
        pass
