"""A demo origin service: what a user runs behind an agent. ``python origin.py HOST PORT``.

- ``/`` greets; ``/headers`` answers with the request's method, path and headers as JSON;
- ``/bytes/N`` streams N bytes of a fixed pattern (checkable end to end);
- ``/echo`` (POST) streams the request body back;
- ``/ws`` echoes WebSocket messages; ``/events`` sends five server-sent events, 0.2 s apart.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import WSMsgType, web

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes /bytes/N sends, for checking a download."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from the origin\n")


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


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/", hello)
    application.router.add_get("/headers", headers)
    application.router.add_get("/bytes/{size:\\d+}", stream_bytes)
    application.router.add_post("/echo", echo)
    application.router.add_get("/ws", websocket)
    application.router.add_get("/events", events)
    return application


if __name__ == "__main__":
    web.run_app(app(), host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
