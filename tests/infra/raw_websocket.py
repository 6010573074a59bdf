"""A WebSocket client that writes raw frames, as an attacker would (a well-behaved library
never sends an oversized or compressed first frame), and reads the server's frames back."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator


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
