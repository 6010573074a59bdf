"""The demo origin: what a user runs behind an agent.

    python demo_origin.py HOST PORT [--udp-echo] [--tls PORT CERT KEY]

``--udp-echo`` also answers UDP datagrams on HOST:PORT (each echoed back, for a UDP Tunnel);
``--tls`` also serves the same pages over HTTPS with a certificate of its own (for a TLS
Tunnel: the gateway passes the connection through and never holds this key).

``make demo`` (hack/demo.py) runs it in the agent's network namespace; the end-to-end tests
run it too (tests/e2e/origin.py only swaps the page at ``/``).

- ``/`` a page saying how the request got here;
- ``/headers`` answers with the request's method, path and headers as JSON;
- ``/bytes/N`` streams N bytes of a fixed pattern (checkable end to end);
- ``/echo`` (POST) streams the request body back;
- ``/ws`` echoes WebSocket messages; ``/events`` sends five server-sent events, 0.2 s apart.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes /bytes/N sends, for checking a download."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


async def hello(request: web.Request) -> web.Response:
    """The demo page: what the origin saw of a request that came through kakuremichi."""
    forwarded = request.headers.get("X-Forwarded-For", "nobody (not through a gateway)")
    proto = request.headers.get("X-Forwarded-Proto", "http")
    local = request.transport.get_extra_info("sockname") if request.transport else None
    origin = f"{local[0]}:{local[1]}" if local else "?"
    lines = [
        "Hello from the kakuremichi demo origin!",
        "",
        "This page came through kakuremichi:",
        f"  you  --{proto}-->  gateway  --WireGuard-->  agent  --http-->  origin",
        "",
        f"  you asked for   {proto}://{request.host}{request.path_qs}",
        f"  you came from   {forwarded} (X-Forwarded-For, set by the gateway)",
        f"  the origin is   a plain HTTP server on {origin}",
        "",
        "More: /headers (what the origin received), /events, /ws, /bytes/N, /echo (POST).",
    ]
    return web.Response(text="\n".join(lines) + "\n")


async def headers(request: web.Request) -> web.Response:
    return web.json_response(
        {"method": request.method, "path": request.path_qs, "headers": dict(request.headers)}
    )


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    sent = 0
    while sent < size:
        chunk = PATTERN[: min(len(PATTERN), size - sent)]
        await response.write(chunk)
        sent += len(chunk)
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    async for chunk in request.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        if message.type == WSMsgType.TEXT:
            await socket.send_str(f"echo: {message.data}")
        elif message.type == WSMsgType.BINARY:
            await socket.send_bytes(message.data)
    return socket


async def events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for number in range(5):
        await response.write(f"data: event {number}\n\n".encode())
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response


def app(root: Handler = hello) -> web.Application:
    application = web.Application()
    application.router.add_get("/", root)
    application.router.add_get("/headers", headers)
    application.router.add_get("/bytes/{size:\\d+}", stream_bytes)
    application.router.add_post("/echo", echo)
    application.router.add_get("/ws", websocket)
    application.router.add_get("/events", events)
    return application


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"demo origin heard: " + data, addr)  # type: ignore[attr-defined]


async def serve(host: str, port: int, udp_echo: bool, tls: list[str] | None) -> None:
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    if udp_echo:
        await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[1], tls[2])
        await web.TCPSite(runner, host, int(tls[0]), ssl_context=context).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="demo_origin.py")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--udp-echo", action="store_true")
    parser.add_argument("--tls", nargs=3, metavar=("PORT", "CERT", "KEY"))
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.udp_echo, args.tls))
