"""The few responses edges write themselves (errors and redirects), as whole byte strings."""

from __future__ import annotations

import html
from http import HTTPStatus

_PAGE = (
    "<!doctype html><html><head><title>{code} {reason}</title></head>"
    "<body><h1>{code} {reason}</h1><p>{detail}</p><hr><p>kakuremichi</p></body></html>\n"
)


def error_response(code: int, detail: str) -> bytes:
    """A complete HTTP/1.1 response with a small HTML page; the connection closes after it.
    ``detail`` may carry what a client sent (its Host): it is escaped."""
    reason = HTTPStatus(code).phrase
    body = _PAGE.format(code=code, reason=reason, detail=html.escape(detail)).encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
