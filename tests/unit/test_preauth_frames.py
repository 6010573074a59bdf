"""Before ``auth`` a client may send 4 KiB of payload in all: more is refused as soon as a frame
header announces it, before the payload is read, against a real aiohttp server and a client that
writes raw frames (as an attacker would, not as a well-behaved library does)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import WSMsgType, web

from kakuremichi.control.preauth_frames import GuardedWebSocketResponse, PreAuthFrames
from tests.infra.raw_websocket import close_code, frame, server_frames, upgrade_request
from tests.infra.web import serving

LIMIT = 4096


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


def test_compression_is_never_negotiated_so_nothing_is_inflated_before_auth() -> None:
    """A compressed frame of 1 KiB inflates to a megabyte: the server must not agree to
    permessage-deflate, and a compressed frame (RSV1) is a protocol error."""

    async def scenario() -> tuple[bytes, Received]:
        async with server() as (port, received):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            writer.write(upgrade_request(port).replace(b"\r\n\r\n", b"\r\n" + offer + b"\r\n"))
            head = await reader.readuntil(b"\r\n\r\n")
            deflated = zlib.compressobj(wbits=-15)
            payload = deflated.compress(b"a" * (1 << 20)) + deflated.flush(zlib.Z_SYNC_FLUSH)
            compressed = bytearray(frame(payload[:-4]))
            compressed[0] |= 0x40  # RSV1: "this message is compressed"
            writer.write(bytes(compressed))
            await close_code(reader)
            writer.close()
            return head, received

    head, received = asyncio.run(scenario())
    assert b"permessage-deflate" not in head.lower()
    assert received == [(WSMsgType.ERROR, 0)]


def test_a_flood_of_empty_frames_is_refused_too() -> None:
    """Headers count: empty pings cost the server a pong each, so they are not free."""

    async def scenario() -> tuple[int | None, Received, int]:
        async with server() as (port, received):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade_request(port))
            await reader.readuntil(b"\r\n\r\n")
            pongs, code = 0, None
            writer.write(frame(b"", opcode=0x9) * 5000)
            with contextlib.suppress(ConnectionError):
                async for opcode, payload in server_frames(reader):
                    if opcode == 0xA:
                        pongs += 1
                    elif opcode == 0x8:
                        code = int(struct.unpack("!H", payload[:2])[0])
                        break
            writer.close()
            return code, received, pongs

    code, received, pongs = asyncio.run(scenario())
    assert received == [(WSMsgType.ERROR, 0)]
    assert code in (4400, None)  # (None: a reset, the client was still writing)
    assert pongs <= (LIMIT + 14) // 6 + 1  # a pong for each ping let through, no more
