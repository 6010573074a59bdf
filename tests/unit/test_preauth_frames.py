"""Before ``auth`` a client may send 4 KiB of payload in all: more is refused as soon as a frame
header announces it, before the payload is read, against a real aiohttp server and a client that
writes raw frames (as an attacker would, not as a well-behaved library does)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import WSMsgType, web

from kakuremichi.control.preauth_frames import GuardedWebSocketResponse, PreAuthFrames
from tests.infra.web import serving

LIMIT = 4096


def frame(
    payload: bytes, opcode: int = 0x1, fin: bool = True, announce: int | None = None
) -> bytes:
    """A masked client frame; ``announce`` overrides the length in its header."""
    length = len(payload) if announce is None else announce
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


Received = list[tuple[WSMsgType, int]]


@asynccontextmanager
async def server() -> AsyncIterator[tuple[int, Received]]:
    """A channel-like endpoint: reads one frame with the 4 KiB guard, then (a TEXT "auth")
    opens up to 1 MiB messages and reads one more; records what it got."""
    received: Received = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = GuardedWebSocketResponse(pre_auth_limit=LIMIT, max_msg_size=1 << 20, timeout=1)
        await socket.prepare(request)
        first = await socket.receive(timeout=5)
        received.append((first.type, len(first.data) if first.type == WSMsgType.TEXT else 0))
        if first.type == WSMsgType.TEXT:
            socket.authenticated()
            await socket.send_str("authenticated")
            second = await socket.receive(timeout=5)
            received.append((second.type, len(second.data) if second.type == WSMsgType.TEXT else 0))
        await socket.close(code=4400)
        return socket

    async with serving("/ws", ws) as port:
        yield port, received


async def server_frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """(opcode, payload) of the server's unmasked frames until the connection ends."""
    while True:
        try:
            head = await asyncio.wait_for(reader.readexactly(2), 5)
        except asyncio.IncompleteReadError:
            return
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await reader.readexactly(8))[0]
        yield head[0] & 0x0F, await reader.readexactly(length)


async def close_code(reader: asyncio.StreamReader) -> int | None:
    """The code of the server's close frame (None: the connection ended without one)."""
    async for opcode, payload in server_frames(reader):
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


async def session(port: int, send: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(port))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        await send(writer)
        return await close_code(reader)
    finally:
        writer.close()


def test_an_auth_sized_frame_passes_and_after_auth_large_messages_do() -> None:
    async def scenario() -> Received:
        async with server() as (port, received):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade_request(port))
            await reader.readuntil(b"\r\n\r\n")
            writer.write(frame(b"a" * LIMIT))
            frames = server_frames(reader)
            assert (await anext(frames))[0] == 0x1  # "authenticated"
            writer.write(frame(b"s" * 200_000))  # a large status report, after auth
            assert await close_code(reader) == 4400
            writer.close()
            return received

    assert asyncio.run(scenario()) == [(WSMsgType.TEXT, LIMIT), (WSMsgType.TEXT, 200_000)]


def test_a_header_announcing_more_is_refused_before_its_payload_is_sent() -> None:
    async def scenario() -> tuple[int | None, Received]:
        async with server() as (port, received):

            async def send(writer: asyncio.StreamWriter) -> None:
                # Only the header of a 1 MiB frame: the refusal must not wait for the payload.
                writer.write(frame(b"", announce=1 << 20))

            code = await session(port, send)
            return code, received

    code, received = asyncio.run(scenario())
    assert code == 4400
    assert received == [(WSMsgType.ERROR, 0)]


def test_many_small_fragments_add_up() -> None:
    async def scenario() -> tuple[int | None, Received]:
        async with server() as (port, received):

            async def send(writer: asyncio.StreamWriter) -> None:
                writer.write(frame(b"x" * 1024, fin=False))
                for _ in range(8):
                    writer.write(frame(b"x" * 1024, opcode=0x0, fin=False))
                    await writer.drain()

            code = await session(port, send)
            return code, received

    code, received = asyncio.run(scenario())
    assert code == 4400 and received == [(WSMsgType.ERROR, 0)]


def test_pings_before_auth_count_too() -> None:
    async def scenario() -> Received:
        async with server() as (port, received):

            async def send(writer: asyncio.StreamWriter) -> None:
                for _ in range(50):
                    writer.write(frame(b"p" * 125, opcode=0x9))
                    await writer.drain()

            # (The refusal may reach the client as a reset: it was still writing.)
            with contextlib.suppress(ConnectionError):
                await session(port, send)
            return received

    assert asyncio.run(scenario()) == [(WSMsgType.ERROR, 0)]


def test_an_oversized_frame_sent_along_with_the_upgrade_request_is_refused_too() -> None:
    async def scenario() -> tuple[int | None, Received]:
        async with server() as (port, received):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade_request(port) + frame(b"", announce=1 << 20))
            await reader.readuntil(b"\r\n\r\n")
            code = await close_code(reader)
            writer.close()
            return code, received

    code, received = asyncio.run(scenario())
    assert code == 4400 and received == [(WSMsgType.ERROR, 0)]


class Reader:
    def __init__(self) -> None:
        self.fed = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Queue:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    def set_exception(self, error: BaseException) -> None:
        self.error = error


def test_headers_split_anywhere_are_followed() -> None:
    """Frame headers arriving a byte at a time (16-bit and 64-bit lengths) are read whole."""
    stream = frame(b"a" * 300) + frame(b"b" * 3000) + frame(b"", announce=1 << 33)
    reader, queue = Reader(), Queue()
    guard = PreAuthFrames(reader, queue, LIMIT)
    refused_at = None
    for i in range(len(stream)):
        eof, _ = guard.feed_data(stream[i : i + 1])
        if eof:
            refused_at = i
            break
    assert refused_at == len(stream) - 1  # at the last byte of the 64-bit length's header
    assert bytes(reader.fed) == stream[:refused_at]  # the reader got nothing of it
    assert queue.error is not None
    guard2 = PreAuthFrames(Reader(), Queue(), LIMIT)
    assert guard2.feed_data(frame(b"a" * 300) + frame(b"b" * 3000)) == (False, b"")
    guard2.open()
    assert guard2.feed_data(frame(b"", announce=1 << 33)) == (False, b"")  # passed through
