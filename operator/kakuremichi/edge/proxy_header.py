"""The PROXY protocol (HAProxy's, versions 1 and 2): the header that tells a server which client a
proxied connection (or datagram) is from. Pure: building headers and reading one.

Agents write one before a tunnel's bytes when the Tunnel asks (``spec.proxyProtocol``); gateways
read one from the load balancers they trust (``Gateway.spec.acceptProxyProtocol``). What is read
is hostile until checked: a header is bounded (a v1 line by 107 bytes, a v2 header by
:data:`MAX_V2_BYTES`), its addresses are parsed as addresses, and anything malformed is refused,
never guessed at. Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

Address = tuple[str, int]
"""(IP address text, port)"""
Version = Literal["V1", "V2"]
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107
"""The longest v1 line, CRLF included (the specification's own bound)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")
MAX_V2_BYTES = 4096
"""A v2 header with its TLVs, at most (load balancers add a few dozen bytes of TLVs)."""
_V2_PROXY, _V2_LOCAL = 0x21, 0x20
_FAMILIES = {
    (4, False): 0x11,  # TCP over IPv4
    (4, True): 0x12,  # UDP over IPv4
    (6, False): 0x21,  # TCP over IPv6
    (6, True): 0x22,  # UDP over IPv6
}
_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}  # by address family (high nibble): IPv4, 6, unix


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header: the connection is refused."""


@dataclass(frozen=True)
class ProxyHeader:
    length: int
    """Bytes of the header: what follows is the client's."""
    source: Address | None
    """The client, or None when the sender proxies nothing (v2 LOCAL, v1 UNKNOWN, a unix
    socket): the connection's own address stands."""
    destination: Address | None = None


# --- writing -------------------------------------------------------------------------------------


def encode(
    version: Version, source: Address | None, destination: Address | None, datagram: bool = False
) -> bytes:
    """The header for a client at ``source`` that reached ``destination``; without both
    (the gateway did not pass them on), one that says the sender knows nothing of the client
    (v1 UNKNOWN, v2 LOCAL), so the target uses the connection's own address."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n" if version == "V1" else _v2(_V2_LOCAL, 0, b"")
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # (an IPv4 client of an IPv6 listener: say it as IPv6)
        src, dst = _as_v6(src), _as_v6(dst)
    if version == "V1":
        if datagram:
            raise ValueError("PROXY protocol v1 has no form for UDP")
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return _v2(_V2_PROXY, _FAMILIES[(src.version, datagram)], body)


def _v2(command: int, family: int, body: bytes) -> bytes:
    return V2_HEADER.pack(V2_SIGNATURE, command, family, len(body)) + body


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


# --- reading -------------------------------------------------------------------------------------


def may_begin_header(data: bytes | bytearray) -> bool:
    """Whether ``data`` is, or begins, a PROXY header (v1 or v2) as far as it goes."""
    return _prefix_of(data, V1_PREFIX) or _prefix_of(data, V2_SIGNATURE)


def _prefix_of(data: bytes | bytearray, signature: bytes) -> bool:
    n = min(len(data), len(signature))
    return bytes(data[:n]) == signature[:n]


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed to tell.
    Raises :class:`ProxyHeaderError` for anything that is not a valid header, including data
    that does not begin with one."""
    if not may_begin_header(data):
        raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")
    if _prefix_of(data, V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = bytes(data[:V1_MAX_BYTES]).find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError("a PROXY v1 line longer than 107 bytes")
        return None
    try:
        line = bytes(data[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("a PROXY v1 line that is not ASCII") from None
    parts = line.split(" ")
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(end + 2, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("a malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    source = (_address(parts[2], version), _port(parts[4]))
    destination = (_address(parts[3], version), _port(parts[5]))
    return ProxyHeader(end + 2, source, destination)


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"{text[:45]!r} is not an IP address") from None
    if getattr(address, "scope_id", None):  # fe80::1%eth0: no client's address
        raise ProxyHeaderError(f"{text[:45]!r} has a scope")
    if address.version != version or str(address) != text.lower():
        raise ProxyHeaderError(f"{text[:45]!r} is not an IPv{version} address as written")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"{text[:8]!r} is not a port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"{port} is not a port")
    return port


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if len(data) < V2_HEADER.size:
        return None
    _, command, family, length = V2_HEADER.unpack_from(bytes(data[: V2_HEADER.size]))
    total = V2_HEADER.size + length
    if command >> 4 != 2:
        raise ProxyHeaderError(f"a PROXY header of version {command >> 4}")
    if command not in (_V2_PROXY, _V2_LOCAL):
        raise ProxyHeaderError(f"a PROXY v2 command {command & 0xF}")
    if total > MAX_V2_BYTES:
        raise ProxyHeaderError(f"a PROXY v2 header of {total} bytes")
    if len(data) < total:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(total, None)
    transport, address_family = family & 0xF, family >> 4
    if address_family == 0 or transport not in (1, 2):  # UNSPEC, or not STREAM/DGRAM
        if address_family not in (0, 1, 2, 3) or transport > 2:
            raise ProxyHeaderError(f"a PROXY v2 family {family:#04x}")
        return ProxyHeader(total, None)
    needed = _ADDRESS_BYTES.get(address_family)
    if needed is None:
        raise ProxyHeaderError(f"a PROXY v2 family {family:#04x}")
    if length < needed:
        raise ProxyHeaderError("a PROXY v2 header shorter than its addresses")
    if address_family == 3:  # a unix socket: no client address to take
        return ProxyHeader(total, None)
    body = bytes(data[V2_HEADER.size : V2_HEADER.size + needed])
    size = 4 if address_family == 1 else 16
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(total, (_unmapped(src), sport), (_unmapped(dst), dport))


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
