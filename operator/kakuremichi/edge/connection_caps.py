"""How many client connections one gateway process holds open, in total and per client address,
checked when a connection is accepted (before its TLS handshake costs anything). Trusted proxies
(load balancers in front, whose connections carry many clients) are held only to the total."""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from kakuremichi.api.resources import ClientLimits
from kakuremichi.edge.request_heads import IpNetwork, trusted
from kakuremichi.edge.stats import EdgeStats


def address_key(address: bytes) -> bytes:
    """What one client is: its IPv4 address, or the /64 of its IPv6 address (one subscriber's
    line holds a whole /64)."""
    if b":" not in address:
        return address
    try:
        network = ipaddress.IPv6Network((address.decode("ascii"), 64), strict=False)
    except ValueError:
        return address
    return str(network.network_address).encode()


class ConnectionCaps:
    def __init__(self, stats: EdgeStats, limits: ClientLimits | None = None) -> None:
        self.stats = stats
        self.limits = limits or ClientLimits()
        self.exempt: tuple[IpNetwork, ...] = ()
        """Addresses held only to the total (trusted proxies)."""
        self.total = 0
        self.by_address: defaultdict[bytes, int] = defaultdict(int)

    def admit(self, address: bytes) -> bytes | None:
        """The key to :meth:`leave` with, or None when the connection is refused (counted)."""
        key = address_key(address)
        if self.total >= self.limits.max_connections:
            self.stats.limit_hits["max_connections"] += 1
            return None
        if self.by_address[key] >= self.limits.max_connections_per_address and not (
            self.exempt and trusted(address, self.exempt)
        ):
            self.stats.limit_hits["max_connections_per_address"] += 1
            return None
        self.total += 1
        self.by_address[key] += 1
        return key

    def leave(self, key: bytes) -> None:
        self.total -= 1
        left = self.by_address[key] - 1
        if left > 0:
            self.by_address[key] = left
        else:
            del self.by_address[key]
