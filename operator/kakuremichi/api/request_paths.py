"""How a request's path is read where rules route by it: one normalization for the gateways,
which match and forward the normalized path, and for control, which ranks and checks rule paths
with it (RFC 3986 6.2.2 and 5.2.4, plus refusals of forms that origins read differently). Pure.
"""

from __future__ import annotations

import re

__all__ = ["PathRefused", "normalize_path"]

_PLAIN = re.compile(rb"/[-A-Za-z0-9._~!$&'()*+,;=:@/]*")
"""A path with nothing to normalize but, maybe, dot segments and repeated slashes."""

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")


class PathRefused(ValueError):
    """A request path no rule may be matched against: answered 400 with this sentence."""


def normalize_path(path: bytes) -> bytes:
    """``path`` (no query) with percent-encoded unreserved characters decoded, other escapes in
    upper case, dot segments removed and repeated slashes merged (RFC 3986 6.2.2, 5.2.4)."""
    if _PLAIN.fullmatch(path) and b"//" not in path and b"/." not in path:
        return path  # (most requests: no escape, no dot segment, no empty segment)
    if not path.startswith(b"/"):
        raise PathRefused("Only requests for a path (/...) are served on this host.")
    if b"\\" in path:
        raise PathRefused("A request path with a backslash is not served on this host.")
    out = bytearray()
    i, size = 0, len(path)
    while i < size:
        byte = path[i]
        if byte == 0x25:  # %
            pair = path[i + 1 : i + 3]
            if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise PathRefused("The request path has a malformed percent-encoding.")
            value = int(pair, 16)
            if value in (0x2F, 0x5C):
                raise PathRefused("A request path with an encoded slash or backslash is not "
                                  "served on this host.")  # fmt: skip
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + pair.upper()
            i += 3
            continue
        if byte <= 0x20 or byte >= 0x7F:
            raise PathRefused("The request path has a character that must be percent-encoded.")
        if byte == 0x23:  # #
            raise PathRefused("A request target with a fragment (#) is not served on this host.")
        out.append(byte)
        i += 1
    segments: list[bytes] = []
    parts = bytes(out).split(b"/")
    for part in parts[1:]:
        if b";" in part and part.partition(b";")[0] in (b".", b".."):
            raise PathRefused("A dot segment with parameters (such as ..;) is not served on "
                              "this host.")  # fmt: skip
        if part == b"..":
            if segments:
                segments.pop()
        elif part not in (b".", b""):
            segments.append(part)
    trailing = len(parts) > 1 and parts[-1] in (b"", b".", b"..") and bool(segments)
    return b"/" + b"/".join(segments) + (b"/" if trailing else b"")
