"""The server name a TLS client asks for, read from its ClientHello without taking part in the
handshake. Pure.

A gateway serving Tunnels with ``protocol: TLS`` looks at the first bytes of each connection on
its HTTPS port: a name of such a Tunnel sends the connection on as it is (its ClientHello
included) to the Tunnel's target, which terminates TLS itself; any other goes to the gateway's
own TLS. The bytes are hostile: they are read as they arrive, each record once (a ClientHello
sent a byte at a time costs what one sent at once does), records and lengths are checked
against each other, and a ClientHello beyond :data:`MAX_HELLO_BYTES` or :data:`MAX_RECORDS`
records is "no name" (the gateway's own TLS then refuses the connection, as it would anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO_BYTES = 16 * 1024
"""A ClientHello larger than this is not peeked at: no name. (Browsers' are under 2 KiB, with
post-quantum key shares; OpenSSL's own limit is larger, but a name is never that far in.)"""
MAX_RECORDS = 8
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True)
class Peeked:
    complete: bool
    """False: the ClientHello has not all arrived; feed more."""
    name: str | None = None
    """The SNI host name, lower-cased (None: no name, or not a TLS ClientHello)."""


MORE = Peeked(False)
NO_NAME = Peeked(True)


class HelloReader:
    """A connection's first bytes, until its ClientHello is whole."""

    __slots__ = ("hello", "raw", "read", "records")

    def __init__(self) -> None:
        self.raw = bytearray()
        """Everything received: what goes on, to the Tunnel or to the gateway's TLS."""
        self.read = 0
        """How far ``raw`` has been taken apart into whole records."""
        self.hello = bytearray()
        """The handshake bytes of those records."""
        self.records = 0

    def feed(self, data: bytes) -> Peeked:
        self.raw += data
        raw = self.raw
        while True:
            start = self.read
            if len(raw) - start < 5:
                return MORE
            if raw[start] != _HANDSHAKE or raw[start + 1] != 3:
                return NO_NAME
            length = int.from_bytes(raw[start + 3 : start + 5], "big")
            if length == 0 or length > MAX_HELLO_BYTES + 4:
                return NO_NAME
            if len(raw) - start - 5 < length:
                return MORE  # (a partial record waits: at most its announced length)
            self.records += 1
            if self.records > MAX_RECORDS:
                return NO_NAME
            self.hello += raw[start + 5 : start + 5 + length]
            self.read = start + 5 + length
            hello = self.hello
            if len(hello) >= 4:
                if hello[0] != _CLIENT_HELLO:
                    return NO_NAME
                size = int.from_bytes(hello[1:4], "big")
                if size > MAX_HELLO_BYTES:
                    return NO_NAME
                if len(hello) >= 4 + size:
                    return Peeked(True, _server_name(memoryview(hello)[4 : 4 + size]))


def peek_server_name(data: bytes | bytearray) -> Peeked:
    """The server name in the ClientHello at the start of ``data``."""
    return HelloReader().feed(bytes(data))


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
