"""What a gateway names when it opens a stream to an agent: the tunnel (its domain) and, for a
Tunnel that wants the client's address passed on in a PROXY header, the client's address and
the gateway's address it reached. Pure.

The form is ``domain`` or ``domain;client-ip;client-port;gateway-ip;gateway-port``: no spaces,
so agents of releases before it read a name with addresses as an unknown tunnel (their stream
answers 404) instead of breaking the connection the stream shares with others. Agents check
every part: a gateway is trusted to say where its client is, not to say it malformed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kakuremichi.edge.proxy_header import Address

MAX_NAME_BYTES = 512
"""A domain (253) and two addresses with ports, with room to spare."""
_SEPARATOR = ";"


class StreamNameError(ValueError):
    pass


@dataclass(frozen=True)
class StreamName:
    domain: str
    client: Address | None = None
    gateway: Address | None = None

    def encode(self) -> str:
        if self.client is None or self.gateway is None:
            return self.domain
        return _SEPARATOR.join(
            (
                self.domain,
                self.client[0],
                str(self.client[1]),
                self.gateway[0],
                str(self.gateway[1]),
            )
        )


def decode(name: str) -> StreamName:
    parts = name.split(_SEPARATOR)
    if len(parts) == 1:
        return StreamName(name)
    if len(parts) != 5:
        raise StreamNameError(f"a stream name of {len(parts)} parts")
    domain, client_ip, client_port, gateway_ip, gateway_port = parts
    return StreamName(
        domain, (_ip(client_ip), _port(client_port)), (_ip(gateway_ip), _port(gateway_port))
    )


def _ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise StreamNameError(f"{text[:45]!r} is not an IP address") from None
    if getattr(address, "scope_id", None):
        raise StreamNameError(f"{text[:45]!r} has a scope")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise StreamNameError(f"{text[:8]!r} is not a port")
    return int(text)
