"""The server name a TLS client asks for, read from its ClientHello without taking part in the
handshake. Pure.

A gateway serving Tunnels with ``protocol: TLS`` looks at the first bytes of each connection on
its HTTPS port: a name of such a Tunnel sends the connection on as it is (its ClientHello
included) to the Tunnel's target, which terminates TLS itself; any other goes to the gateway's
own TLS. The bytes are hostile: records and lengths are checked against each other and against
:data:`MAX_HELLO_BYTES`, and anything malformed is "no name" (the gateway's own TLS then refuses
the connection, as it would have anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO_BYTES = 32 * 1024
"""A ClientHello larger than this (over several records) is not peeked at: no name."""
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True)
class Peeked:
    complete: bool
    """False: the ClientHello has not all arrived; look again with more bytes."""
    name: str | None = None
    """The SNI host name, lower-cased (None: no name, or not a TLS ClientHello)."""


MORE = Peeked(False)
NO_NAME = Peeked(True)


def peek_server_name(data: bytes | bytearray) -> Peeked:
    """The server name in the ClientHello at the start of ``data``."""
    hello = bytearray()
    offset = 0
    while True:  # handshake records, until the ClientHello they carry is whole
        if len(data) - offset < 5:
            return MORE
        if data[offset] != _HANDSHAKE or data[offset + 1] != 3:
            return NO_NAME
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > 16384 + 2048:
            return NO_NAME
        if len(data) - offset - 5 < length:
            if offset + 5 + length > MAX_HELLO_BYTES + 5 * 8:
                return NO_NAME
            return MORE
        hello += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(hello) >= 4:
            if hello[0] != _CLIENT_HELLO:
                return NO_NAME
            size = int.from_bytes(hello[1:4], "big")
            if size > MAX_HELLO_BYTES:
                return NO_NAME
            if len(hello) >= 4 + size:
                return Peeked(True, _server_name(memoryview(hello)[4 : 4 + size]))


def _server_name(body: memoryview) -> str | None:
    try:
        at = 2 + 32  # version, random
        at += 1 + body[at]  # session id
        at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher suites
        at += 1 + body[at]  # compression methods
        if at == len(body):
            return None  # no extensions
        end = at + 2 + int.from_bytes(body[at : at + 2], "big")
        if end > len(body):
            return None
        at += 2
        while at + 4 <= end:
            kind = int.from_bytes(body[at : at + 2], "big")
            size = int.from_bytes(body[at + 2 : at + 4], "big")
            at += 4
            if at + size > end:
                return None
            if kind == _SERVER_NAME:
                return _host_name(body[at : at + size])
            at += size
    except IndexError:
        return None
    return None


def _host_name(extension: memoryview) -> str | None:
    if len(extension) < 2:
        return None
    end = 2 + int.from_bytes(extension[:2], "big")
    at = 2
    while at + 3 <= min(end, len(extension)):
        kind = extension[at]
        size = int.from_bytes(extension[at + 1 : at + 3], "big")
        at += 3
        if at + size > len(extension):
            return None
        if kind == _HOST_NAME:
            raw = bytes(extension[at : at + size]).lower().rstrip(b".")
            if not raw or len(raw) > 253 or not set(raw) <= _NAME_BYTES:
                return None
            return raw.decode("ascii")
        at += size
    return None
