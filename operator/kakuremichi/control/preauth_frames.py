"""Bytes a WebSocket client may send before it has authenticated: one small ``auth`` frame.

aiohttp's WebSocket reader takes its message size limit once per connection, and the control
channel needs 1 MiB after ``auth`` (status reports) but only 4 KiB before it. A reader that
took 1 MiB would buffer a megabyte from anybody who connects. So a :class:`PreAuthFrames` sits
in front of the reader until the session is authenticated: it follows the frame headers of
everything the client sends and refuses the connection (close code 4400, nothing more read)
as soon as the frames announced so far, headers included, come to more than the limit plus one
frame header: one large frame, many fragments, or a flood of empty pings alike. After
:meth:`PreAuthFrames.open` it passes bytes straight through.

The reader only ever gets bytes the guard let through. (What aiohttp read from the socket
together with the upgrade request, at most one read, waits in its buffer until the guard has
looked at it.) Compression is never negotiated: a compressed frame would be inflated to the
reader's 1 MiB limit, whatever its size on the wire.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WebSocketError, web

from kakuremichi.api import protocol

MAX_HEADER_BYTES = 14  # 2, 8 bytes of extended length, 4 of mask


class PreAuthFrames:
    """Stands between aiohttp's request handler and its WebSocket reader (the handler calls
    ``feed_data``/``feed_eof``, as it would on the reader)."""

    def __init__(self, reader: Any, queue: Any, limit: int) -> None:
        self._reader = reader
        self._queue = queue
        self._limit = limit
        self._header = bytearray()
        self._payload_left = 0
        self._announced = 0
        self.passing = False
        self.refused = False

    def open(self) -> None:
        """The session is authenticated: from now on every byte goes to the reader."""
        self.passing = True

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.passing:
            result: tuple[bool, bytes] = self._reader.feed_data(data)
            return result
        if self.refused:
            return True, b""
        if not self._follow(memoryview(data)):
            self.refused = True
            self._queue.set_exception(
                WebSocketError(
                    protocol.CLOSE_BAD_REQUEST,
                    f"more than {self._limit} bytes before authentication",
                )
            )
            return True, b""  # the handler stops reading this connection
        result = self._reader.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: memoryview) -> bool:
        """Walk the frame headers in ``data``; False once the frames announced so far (headers
        and payloads) exceed the limit and one header."""
        position = 0
        while position < len(data):
            if self._payload_left:
                step = min(self._payload_left, len(data) - position)
                self._payload_left -= step
                position += step
                continue
            needed = _header_length(self._header)
            take = min(needed - len(self._header), len(data) - position)
            self._header += data[position : position + take]
            position += take
            if len(self._header) < _header_length(self._header):
                continue  # (it grows once the second byte says how long it is)
            length = _payload_length(self._header)
            self._announced += len(self._header) + length
            self._header.clear()
            if self._announced > self._limit + MAX_HEADER_BYTES:
                return False
            self._payload_left = length
        return True


def _header_length(header: bytearray) -> int:
    """Bytes of the frame header once its second byte is known (2 before that)."""
    if len(header) < 2:
        return 2
    marker = header[1] & 0x7F
    extended = 2 if marker == 126 else 8 if marker == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)


def _payload_length(header: bytearray) -> int:
    marker = header[1] & 0x7F
    if marker == 126:
        return int.from_bytes(header[2:4], "big")
    if marker == 127:
        return int.from_bytes(header[2:10], "big")
    return marker


class GuardedWebSocketResponse(web.WebSocketResponse):
    """A server-side WebSocket whose reader gets nothing over ``pre_auth_limit`` bytes of
    payload until :meth:`authenticated` is called."""

    def __init__(self, *, pre_auth_limit: int, **options: Any) -> None:
        super().__init__(compress=False, **options)
        self._pre_auth_limit = pre_auth_limit
        self.pre_auth: PreAuthFrames | None = None
        self._transport: Any = None

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        self._transport = request.transport
        handler: Any = request.protocol
        # Bytes that came with the upgrade request itself go through the guard too.
        tail, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        guard = PreAuthFrames(handler._payload_parser, self._reader, self._pre_auth_limit)
        handler._payload_parser = guard
        self.pre_auth = guard
        if tail:
            eof, _ = guard.feed_data(tail)
            if eof:
                handler.close()

    def authenticated(self) -> bool:
        """Lift the limit; False when the guard has refused the connection already (its close
        is under way: do not start a session on it)."""
        assert self.pre_auth is not None
        if self.pre_auth.refused:
            return False
        self.pre_auth.open()
        return True

    def abort(self) -> None:
        """Drop the connection at once, whatever is still unsent (a client that does not read
        would keep a closed connection's buffer, and its place, alive)."""
        if self._transport is not None:
            self._transport.abort()
