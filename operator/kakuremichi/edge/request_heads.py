"""The rules the gateway applies to a client's request head before any of it goes upstream: what
is refused, which fields are dropped, and the client address the origin is told.

Pure functions on bytes, called once per request by :mod:`kakuremichi.edge.https_proxy`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"transfer-encoding",
))  # fmt: skip
"""Fields of one connection only (RFC 9110 7.6.1): never forwarded as the client sent them
(the gateway writes its own Transfer-Encoding and, for an upgrade, Connection and Upgrade)."""
ADDRESS_FIELDS = frozenset((
    b"forwarded", b"x-real-ip", b"true-client-ip", b"x-client-ip", b"x-cluster-client-ip",
    b"cf-connecting-ip", b"fastly-client-ip", b"x-original-forwarded-for",
))  # fmt: skip
"""Fields origins read a client's address from: only the gateway may set them. (Every
``X-Forwarded-*`` field too.)"""
FRAMING = frozenset((b"host", b"content-length", b"transfer-encoding"))
"""Never dropped because ``Connection`` names them: that would change what the origin parses."""
VERSIONS = frozenset(("1.0", "1.1"))


def address_field(lower: bytes) -> bool:
    """A field naming the client's address (its underscore spelling too, which CGI-style
    servers read as the same variable)."""
    if b"_" in lower:
        lower = lower.replace(b"_", b"-")
    return lower in ADDRESS_FIELDS or lower.startswith(b"x-forwarded-")


def connection_options(values: Sequence[bytes]) -> frozenset[bytes]:
    """Field names listed in ``Connection`` (besides close/keep-alive/upgrade), to be dropped;
    framing fields are never among them."""
    names = {
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    }
    return frozenset(names - {b"close", b"keep-alive", b"upgrade"} - FRAMING)


def transfer_coding_error(values: Sequence[bytes], version: str) -> str | None:
    """Why a request's Transfer-Encoding cannot be forwarded, or None. Only ``chunked`` alone
    is accepted: other codings are where proxies and origins disagree on framing."""
    if not values:
        return None
    if version != "1.1":
        return "Transfer-Encoding is not allowed in HTTP/1.0 requests."
    codings = [t.strip().lower() for value in values for t in value.split(b",")]
    if codings != [b"chunked"]:
        return "Transfer-Encoding must be exactly 'chunked'."
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """The request target to forward (origin-form), and the authority an absolute-form
    target named (empty for origin-form)."""

    path: bytes
    authority: bytes


def request_target(url: bytes, method: bytes) -> Target | None:
    """The target as forwarded, or None when it is not one an origin server takes: absolute
    form (``http://host/path``) becomes origin form, ``*`` is kept for OPTIONS."""
    if url.startswith(b"/"):
        return Target(url, b"")
    if url == b"*" and method == b"OPTIONS":
        return Target(url, b"")
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        return None  # userinfo is not for HTTP (RFC 9110 4.2.4)
    if not path.startswith(b"/"):
        path = b"/" + path
    return Target(path, authority)


def parse_networks(cidrs: Sequence[str]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _address(text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trusted(address: bytes, proxies: Sequence[IpNetwork]) -> bool:
    parsed = _address(address) if proxies else None
    return parsed is not None and any(parsed in network for network in proxies)


def forwarded_for(
    client: bytes, sent: Sequence[bytes], proxies: Sequence[IpNetwork]
) -> tuple[bytes, bytes]:
    """``X-Forwarded-For`` and ``X-Real-IP`` for a request from ``client`` that carried
    ``sent`` X-Forwarded-For values. Only a trusted proxy's list is kept (appended to); the real
    address is then the nearest one that is not a trusted proxy."""
    if not sent or not trusted(client, proxies):
        return client, client
    chain = [hop.strip() for value in sent for hop in value.split(b",") if hop.strip()]
    real = client
    for hop in reversed(chain):
        if _address(hop) is None:
            break  # garbage in the chain: believe nothing before it
        real = hop
        if not trusted(hop, proxies):
            break
    return b", ".join((*chain, client)), real


def client_address(peer: object) -> bytes:
    """The peer's address as text, an IPv4-mapped IPv6 address as plain IPv4."""
    if not isinstance(peer, tuple) or not peer:
        return b""
    text = str(peer[0])
    if text.startswith("::ffff:") and "." in text:
        text = text[7:]
    return text.encode()
