"""How a UDP tunnel's datagrams travel between a gateway and an agent, inside WireGuard: one
datagram each, without a TCP hop, between the two edges' relay ports (UDP 8471). Pure.

A frame is a 1-byte version, the tunnel's public port (2 bytes, which names the tunnel: one per
protocol and port), the client's address family (4 or 6), address and port, then the datagram
as the client sent it (toward the agent) or as the target answered (toward the gateway). The
client's address says which flow an answer belongs to; the gateway sends an answer only to a
client of a flow it opened toward that agent, so no agent can use a gateway to send elsewhere.
"""

from __future__ import annotations

import ipaddress
import struct

from kakuremichi.edge.proxy_header import Address

VERSION = 1
_HEAD = struct.Struct("!BHB")
WIREGUARD_MTU = 1420
"""The edges' WireGuard interfaces' MTU (WireGuard's default)."""
IPV4_UDP_BYTES = 20 + 8
"""The frame's own IP and UDP headers inside the tunnel (the edges speak IPv4 there)."""


class FrameError(ValueError):
    pass


def overhead(client_ip: str) -> int:
    return _HEAD.size + (16 if ":" in client_ip else 4) + 2


def max_datagram(client_ip: str, mtu: int = WIREGUARD_MTU) -> int:
    """The largest datagram of this client that fits one WireGuard packet with its frame: 1382
    bytes for an IPv4 client, 1370 for an IPv6 one (MTU 1420); larger ones are dropped."""
    return mtu - IPV4_UDP_BYTES - overhead(client_ip)


def encode(port: int, client: Address, payload: bytes | memoryview) -> bytes:
    address = ipaddress.ip_address(client[0])
    return b"".join(
        (_HEAD.pack(VERSION, port, address.version), address.packed,
         client[1].to_bytes(2, "big"), payload)
    )  # fmt: skip


def decode(frame: bytes) -> tuple[int, Address, memoryview]:
    """(tunnel port, client address, datagram)."""
    if len(frame) < _HEAD.size:
        raise FrameError("a frame shorter than its header")
    version, port, family = _HEAD.unpack_from(frame)
    if version != VERSION:
        raise FrameError(f"a frame of version {version}")
    if family not in (4, 6) or port == 0:
        raise FrameError("a malformed frame header")
    size = 4 if family == 4 else 16
    end = _HEAD.size + size + 2
    if len(frame) < end:
        raise FrameError("a frame shorter than its header")
    view = memoryview(frame)
    ip = str(ipaddress.ip_address(bytes(view[_HEAD.size : _HEAD.size + size])))
    client_port = int.from_bytes(view[end - 2 : end], "big")
    return port, (ip, client_port), view[end:]
