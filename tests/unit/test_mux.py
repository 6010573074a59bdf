"""Streams between a gateway and an agent over one TCP connection, on loopback: what the proxy
and the relay rely on — data intact and in order per stream, one connection for many streams, a
slow reader stopping only its own stream, half-close, close and loss reaching the other side, and
a peer that breaks the framing rules cut off."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from kakuremichi.edge import mux
from kakuremichi.edge.mux import MuxConnection, MuxDialer, MuxStream, PeerUnreachable
from tests.infra.ports import free_port


class Collector(asyncio.Protocol):
    """Records what a stream delivers; optionally echoes it back."""

    def __init__(
        self, echo: bool = False, keep_open_on_eof: bool = False, paused: bool = False
    ) -> None:
        self.paused = paused
        self.echo = echo
        self.keep_open_on_eof = keep_open_on_eof
        self.stream: MuxStream | None = None
        self.data = bytearray()
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.pauses = 0
        self.resumes = 0
        self.grew = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MuxStream)
        self.stream = transport
        if self.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.grew.set()
        if self.echo and self.stream is not None:
            self.stream.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.grew.set()
        if self.echo and self.stream is not None:
            self.stream.write(b"bye")
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():
                self.grew.clear()
                await self.grew.wait()


@dataclass
class Agent:
    port: int
    accepted: list[tuple[str, Collector]] = field(default_factory=list)
    connections: list[MuxConnection] = field(default_factory=list)
    echo: bool = True
    keep_open_on_eof: bool = False
    paused: bool = False


@asynccontextmanager
async def agent(
    echo: bool = True, keep_open_on_eof: bool = False, paused: bool = False
) -> AsyncIterator[Agent]:
    side = Agent(free_port(), echo=echo, keep_open_on_eof=keep_open_on_eof, paused=paused)

    def accept(domain: str) -> asyncio.Protocol:
        protocol = Collector(side.echo, side.keep_open_on_eof, side.paused)
        side.accepted.append((domain, protocol))
        return protocol

    def connection() -> MuxConnection:
        made = MuxConnection(accept=accept)
        side.connections.append(made)
        return made

    server = await asyncio.get_running_loop().create_server(connection, "127.0.0.1", side.port)
    try:
        yield side
    finally:
        server.close()
        for made in side.connections:
            made.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_many_streams_share_one_connection_and_keep_their_bytes_apart() -> None:
    async def scenario() -> None:
        async with agent() as side:
            dialer = MuxDialer(side.port)
            clients = [Collector() for _ in range(50)]
            payloads = [os.urandom(1000 + 7919 * i) for i in range(50)]
            for index, client in enumerate(clients):
                stream = dialer.open_stream("127.0.0.1", f"App{index}.Example.com", client)
                stream.write(payloads[index][:500])
                stream.write(payloads[index][500:])
            for client, payload in zip(clients, payloads, strict=True):
                await client.wait_for(lambda c=client, p=payload: len(c.data) >= len(p))  # type: ignore[misc]
                assert bytes(client.data) == payload
            assert len(side.connections) == 1
            assert [d for d, _ in side.accepted] == [f"app{i}.example.com" for i in range(50)]
            dialer.close_all()

    run(scenario)


def test_a_reader_that_stops_pauses_only_its_own_stream() -> None:
    async def scenario() -> None:
        async with agent(echo=False) as side:
            dialer = MuxDialer(side.port)
            slow, fast = Collector(), Collector()
            slow_stream = dialer.open_stream("127.0.0.1", "slow.example.com", slow)
            fast_stream = dialer.open_stream("127.0.0.1", "fast.example.com", fast)
            await asyncio.sleep(0.05)
            slow_reader = side.accepted[0][1]
            assert slow_reader.stream is not None
            slow_reader.stream.pause_reading()
            big = os.urandom(mux.WINDOW_BYTES + mux.OUTBOX_HIGH_WATER + 100_000)
            slow_stream.write(big)
            assert slow.pauses == 1  # beyond window + high water: the writer is told to stop
            fast_stream.write(b"still moving")
            fast_reader = side.accepted[1][1]
            await fast_reader.wait_for(lambda: bytes(fast_reader.data) == b"still moving")
            assert len(slow_reader.data) <= mux.WINDOW_BYTES
            slow_reader.stream.resume_reading()
            await slow_reader.wait_for(lambda: len(slow_reader.data) == len(big))
            assert bytes(slow_reader.data) == big
            assert slow.resumes == 1
            dialer.close_all()

    run(scenario)


def test_half_close_close_and_loss_reach_the_other_side() -> None:
    async def scenario() -> None:
        async with agent(keep_open_on_eof=True) as side:
            dialer = MuxDialer(side.port)
            client = Collector()
            stream = dialer.open_stream("127.0.0.1", "app.example.com", client)
            stream.write(b"request")
            stream.write_eof()
            await client.wait_for(lambda: bytes(client.data) == b"requestbye")
            reader = side.accepted[0][1]
            assert reader.eof
            stream.close()  # the agent's side learns it and forgets the stream
            assert await asyncio.wait_for(reader.lost, 5) is None
            assert await asyncio.wait_for(client.lost, 5) is None

            others = [Collector() for _ in range(3)]
            for other in others:
                dialer.open_stream("127.0.0.1", "app.example.com", other)
            await asyncio.sleep(0.05)
            side.connections[0].close()  # the agent goes away: every stream ends
            for other in others:
                await asyncio.wait_for(other.lost, 5)
            again = Collector(echo=False)
            fresh = dialer.open_stream("127.0.0.1", "app.example.com", again)
            assert not fresh.on_existing_connection  # a new connection replaced the lost one
            fresh.write(b"x")
            await again.wait_for(lambda: bytes(again.data) == b"x")
            assert len(side.connections) == 2
            dialer.close_all()

    run(scenario)


def test_an_unreachable_agent_ends_the_stream_with_peer_unreachable() -> None:
    async def scenario() -> None:
        dialer = MuxDialer(free_port())  # nobody listens
        client = Collector()
        dialer.open_stream("127.0.0.1", "app.example.com", client).write(b"lost")
        assert isinstance(await asyncio.wait_for(client.lost, 10), PeerUnreachable)

    run(scenario)


def test_a_peer_breaking_the_rules_is_cut_off() -> None:
    async def exchange(payload: bytes) -> bytes:
        async with agent(paused=True) as side:  # nothing is handed on: no credit comes back
            reader, writer = await asyncio.open_connection("127.0.0.1", side.port)
            writer.write(payload)
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                answer = b"<reset>"
            writer.close()
            assert side.accepted == [] or len(side.accepted) == 1
            return answer

    async def scenario() -> None:
        assert await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") in (b"", b"<reset>")
        too_big = mux.HEADER.pack(mux.DATA, 1, mux.MAX_FRAME_BYTES + 1)
        assert await exchange(mux.HELLO + too_big) in (b"", b"<reset>")
        opened = mux.frame(mux.OPEN, 1, b"app.example.com")
        full = mux.frame(mux.DATA, 1, b"x" * mux.MAX_FRAME_BYTES)
        beyond = full * (mux.WINDOW_BYTES // mux.MAX_FRAME_BYTES) + mux.frame(mux.DATA, 1, b"x")
        assert await exchange(mux.HELLO + opened + beyond) in (b"", b"<reset>")
        assert await exchange(mux.HELLO + mux.frame(9, 1)) in (b"", b"<reset>")

    run(scenario)


def test_a_silent_connection_is_dropped_after_the_hello_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mux, "HELLO_TIMEOUT", 0.2)

    async def scenario() -> None:
        async with agent() as side:
            with socket.create_connection(("127.0.0.1", side.port)) as sock:
                sock.settimeout(5)
                await asyncio.sleep(0.5)  # the agent's timer fires meanwhile
                assert sock.recv(10) == b""

    run(scenario)
