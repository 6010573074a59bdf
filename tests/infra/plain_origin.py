"""An HTTP/1.1 origin that behaves the way real servers do where proxies get it wrong: it keeps
connections alive, answers some requests before reading their bodies (as nginx, Go and Node do
for a 401/405/redirect) and then discards the body, refuses upgrades it does not serve, and
echoes what it received. Every request head it reads is logged, so a test can see exactly what
reached the origin.

Paths: ``/early`` (401 at once, then the body is read and dropped), ``/whoami`` (``you are
<X-User>``), ``/headers`` (the head as JSON: method, target, header list), ``/ws`` (refuses an
upgrade with 200), ``/ws-slow`` (the same after 2 s), ``/ws-ok`` (101, then echoes bytes),
``/overrun`` (a broken origin: writes past its own Content-Length, a whole second response
``you are evil``), ``/big`` (16 MiB), anything else ``ok``.

Run as ``python -m tests.infra.plain_origin PORT [LOG]`` or start :func:`serve` in a loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field


@dataclass
class Seen:
    heads: list[dict[str, object]] = field(default_factory=list)


def _response(status: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n"
        f"{extra}\r\n"
    ).encode() + body


async def _body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    values = {k.lower(): v for k, v in headers}
    if values.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return body
            body += (await reader.readexactly(size + 2))[:-2]
    length = int(values.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


async def _connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen, log: str | None
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
            headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
            record: dict[str, object] = {"method": method, "target": target, "headers": headers}
            seen.heads.append(record)
            if log:
                with open(log, "a") as out:  # noqa: ASYNC230 - a line, in a test origin
                    out.write(json.dumps(record) + "\n")
            path = target.split("?")[0]
            values = {k.lower(): v for k, v in headers}
            if path == "/early":
                writer.write(_response("401 Unauthorized", b"unauthorized\n"))
                await writer.drain()
                await _body(reader, headers)  # then the body, dropped
                continue
            body = await _body(reader, headers)
            if path == "/whoami":
                writer.write(_response("200 OK", f"you are {values.get('x-user', '?')}".encode()))
            elif path == "/headers":
                writer.write(_response("200 OK", json.dumps(record | {"body": body.decode(
                    "latin-1")}).encode()))  # fmt: skip
            elif path == "/ws":
                writer.write(_response("200 OK", b"no upgrades here\n"))
            elif path == "/ws-slow":
                await asyncio.sleep(2)
                writer.write(_response("200 OK", b"no upgrades here either\n"))
            elif path == "/overrun":
                writer.write(_response("200 OK", b"ok") + _response("200 OK", b"you are evil"))
            elif path == "/big":
                writer.write(_response("200 OK", b"b" * (16 << 20)))
            elif path == "/ws-ok" and "upgrade" in values:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: " + values["upgrade"].encode() + b"\r\n\r\n")  # fmt: skip
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(b"echo: " + data)
                return
            else:
                writer.write(_response("200 OK", b"ok\n"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, log: str | None = None) -> tuple[asyncio.Server, Seen]:
    seen = Seen()
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, seen, log), host, port, limit=1 << 20
    )
    return server, seen


async def _main(port: int, log: str | None) -> None:
    server, _ = await serve("127.0.0.1", port, log)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
