"""The gateway's HTTPS proxy and the agent's relay, wired on loopback (no root, no WireGuard):
the HTTP/1.1 behaviour a client sees — keep-alive, pipelining, HEAD, chunked bodies, errors —
and the upstream pool's reuse and recovery."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.api.resources import ClientLimits
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.sni import SniContexts
from kakuremichi.edge.stats import EdgeStats
from tests.e2e import origin
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA

DOMAIN = "app.example.com"


@dataclass
class Stack:
    https_port: int
    relay: AgentRelay
    proxy: HttpsProxy
    gateway_stats: EdgeStats
    agent_stats: EdgeStats
    client_tls: ssl.SSLContext
    origin_port: int

    async def connect(
        self, name: str = DOMAIN
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", self.https_port, ssl=self.client_tls, server_hostname=name
        )


@asynccontextmanager
async def stack(agent_listening: bool = True) -> AsyncIterator[Stack]:
    ca = TestCA()
    issued = ca.issue(DOMAIN)
    runner = web.AppRunner(origin.app(), access_log=None)
    await runner.setup()
    origin_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", origin_port).start()
    agent_stats, gateway_stats = EdgeStats("agent"), EdgeStats("gateway")
    relay = AgentRelay(agent_stats)
    relay.set_targets({DOMAIN: AgentTarget(f"localhost:{origin_port}")})
    relay.set_gateways({"127.0.0.1"})  # the gateway connects from loopback here
    relay_port = free_port()
    loop = asyncio.get_running_loop()
    relay_server = (
        await loop.create_server(relay.protocol, "127.0.0.1", relay_port)
        if agent_listening
        else None
    )
    proxy = HttpsProxy(gateway_stats, relay_port=relay_port)
    proxy.set_routes({DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1")})
    sni = SniContexts()
    sni.install(
        sni.prepare(
            [CertificateBundle(domain=DOMAIN, certificate=issued.certificate_pem,
                               private_key=issued.private_key_pem)]
        )
    )  # fmt: skip
    https_port = free_port()
    server = await serve(proxy, sni.front, "127.0.0.1", https_port)
    try:
        yield Stack(
            https_port, relay, proxy, gateway_stats, agent_stats,
            ssl.create_default_context(cadata=ca.pem), origin_port,
        )  # fmt: skip
    finally:
        server.close()
        proxy.close_all()
        relay.close_all()
        if relay_server is not None:
            relay_server.close()
        await runner.cleanup()


async def read_response(
    reader: asyncio.StreamReader, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if head_only:
        return status, headers, b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return status, headers, body


def request(path: str, method: str = "GET", host: str = DOMAIN, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_keep_alive_pipelining_and_head_on_one_connection() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(request("/headers"))
            status, _, body = await read_response(reader)
            assert status == 200 and json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"
            writer.write(request("/", "HEAD"))
            status, headers, _ = await read_response(reader, head_only=True)
            assert status == 200 and int(headers["content-length"]) > 0
            writer.write(request("/bytes/10") + request("/bytes/20") + request("/"))
            sizes = [len((await read_response(reader))[2]) for _ in range(3)]
            assert sizes == [10, 20, len("hello from the origin\n")]
            writer.close()
            assert s.gateway_stats.requests[(DOMAIN, 200)] == 5
            assert s.agent_stats.connections_total == 1  # one upstream carried them all

    run(scenario)


def test_chunked_upload_is_streamed_through() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(request("/echo", "POST", extra="Transfer-Encoding: chunked\r\n"))
            for part in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"hello chunked world")
            writer.close()

    run(scenario)


def test_wrong_or_unknown_host_and_disabled_tunnels_are_answered_by_the_gateway() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            s.proxy.routes["other.example.com"] = GatewayRoute(
                domain="other.example.com", agent_ip="127.0.0.1"
            )
            writer.write(request("/", host="other.example.com"))
            status, headers, _ = await read_response(reader)
            assert status == 421 and headers["connection"] == "close"
            reader, writer = await s.connect()
            writer.write(request("/", host="nowhere.example.com"))
            assert (await read_response(reader))[0] == 404
            s.proxy.set_routes(
                {DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1", enabled=False)}
            )
            reader, writer = await s.connect()
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 404

    run(scenario)


def test_a_held_domain_without_agent_answers_503_and_reaches_no_agent() -> None:
    """The domain's holder has no agent now: its visitors get the standard 503 page under
    the holder's certificate, and nothing reaches any agent (not another tenant's either)."""

    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 200  # kept upstream: must not be used
            s.proxy.set_routes({DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip=None)})
            served_before = s.agent_stats.connections_total
            for _ in range(2):
                reader, writer = await s.connect()
                writer.write(request("/") + request("/"))
                status, headers, body = await read_response(reader)
                assert (status, headers["connection"]) == (503, "close")
                assert b"not reachable right now" in body
                assert await reader.read() == b""  # the pipelined one was not forwarded
            assert s.agent_stats.connections_total == served_before
            assert s.gateway_stats.requests[(DOMAIN, 503)] == 2

    run(scenario)


def test_target_down_and_agent_unreachable_give_502() -> None:
    async def scenario() -> None:
        async with stack() as s:
            s.relay.set_targets({DOMAIN: AgentTarget(f"127.0.0.1:{free_port()}")})
            reader, writer = await s.connect()
            writer.write(request("/"))
            status, _, body = await read_response(reader)
            assert status == 502 and b"not answering" in body
        async with stack(agent_listening=False) as s:
            reader, writer = await s.connect()
            writer.write(request("/"))
            status, _, body = await read_response(reader)
            assert status == 502 and b"unreachable" in body
            assert s.gateway_stats.errors["agent_unreachable"] == 1

    run(scenario)


def test_idle_upstreams_are_reused_and_replaced_when_the_agent_closed_them() -> None:
    async def scenario() -> None:
        async with stack() as s:
            for _ in range(3):  # one client connection after another
                reader, writer = await s.connect()
                writer.write(request("/"))
                assert (await read_response(reader))[0] == 200
                writer.close()
                await asyncio.sleep(0.05)
            assert s.agent_stats.connections_total == 1
            # The agent side goes away while the upstream sits idle in the pool; the next
            # request must not see it.
            s.relay.close_all()
            reader, writer = await s.connect()
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 200
            assert s.agent_stats.connections_total == 2

    run(scenario)


def test_websocket_upgrade_is_spliced_both_ways() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(request("/ws", extra=(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            )))  # fmt: skip
            status, headers, _ = await read_response(reader, head_only=True)
            assert status == 101 and headers["upgrade"].lower() == "websocket"
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"ping"))
            writer.write(b"\x81\x84" + mask + payload)  # a masked text frame "ping"
            frame = await asyncio.wait_for(reader.readexactly(2 + len("echo: ping")), 10)
            assert frame[2:] == b"echo: ping"

    run(scenario)


def test_requests_pipelined_behind_a_refused_one_are_not_forwarded() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(request("/", host="nowhere.example.com") + request("/headers"))
            status, _, _ = await read_response(reader)
            assert status == 404
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing more
            assert s.agent_stats.connections_total == 0

    run(scenario)


def test_unknown_names_and_silent_clients_get_no_tls_session() -> None:
    async def scenario() -> None:
        async with stack() as s:
            # (below the field's minimum, which a test may go under)
            s.proxy.set_front_end(ClientLimits.model_construct(handshake_timeout_seconds=0.3), [])
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                await s.connect("other.example.com")
            assert s.gateway_stats.errors["tls_handshake"] == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", s.https_port)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing sent
            writer.close()
            assert s.gateway_stats.errors["tls_handshake_timeout"] == 1
            reader, writer = await s.connect()  # the listener is unaffected
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 200
            writer.close()

    run(scenario)


H2C_DOMAIN = "grpc.example.com"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_an_h2c_tunnel_passes_http2_clients_through_and_answers_others_505() -> None:
    """A target that speaks h2c (gRPC): TLS offers h2; an HTTP/2 client's bytes reach the
    target untouched from the preface on, and the target's bytes come back; a client without
    HTTP/2 gets 505 over HTTP/1.1; the HTTP/1.1 tunnel beside it still negotiates http/1.1."""

    async def scenario() -> None:
        received = bytearray()

        async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(65536):
                received.extend(chunk)
                writer.write(b"from-target:" + chunk)
                await writer.drain()
            writer.close()

        target_server = await asyncio.start_server(target, "127.0.0.1", 0)
        target_port = target_server.sockets[0].getsockname()[1]
        ca = TestCA()
        bundles = [
            CertificateBundle(domain=name, certificate=issued.certificate_pem,
                              private_key=issued.private_key_pem)
            for name, issued in ((n, ca.issue(n)) for n in (H2C_DOMAIN, DOMAIN))
        ]  # fmt: skip
        stats = EdgeStats("gateway")
        relay = AgentRelay(EdgeStats("agent"))
        relay.set_targets(
            {
                H2C_DOMAIN: AgentTarget(f"localhost:{target_port}"),
                DOMAIN: AgentTarget("localhost:1"),
            }
        )
        relay.set_gateways({"127.0.0.1"})  # the gateway connects from loopback here
        relay_port = free_port()
        loop = asyncio.get_running_loop()
        relay_server = await loop.create_server(relay.protocol, "127.0.0.1", relay_port)
        proxy = HttpsProxy(stats, relay_port=relay_port)
        routes = [GatewayRoute(domain=H2C_DOMAIN, agent_ip="127.0.0.1", h2c=True),
                  GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1")]  # fmt: skip
        proxy.set_routes({r.domain: r for r in routes})
        sni = SniContexts()
        sni.install(sni.prepare(bundles, h2_domains={H2C_DOMAIN}))
        https_port = free_port()
        server = await serve(proxy, sni.front, "127.0.0.1", https_port)

        async def connect(
            name: str, alpn: list[str]
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
            client_tls = ssl.create_default_context(cadata=ca.pem)
            client_tls.set_alpn_protocols(alpn)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", https_port, ssl=client_tls, server_hostname=name
            )
            return reader, writer, writer.get_extra_info("ssl_object").selected_alpn_protocol()

        try:
            reader, writer, chosen = await connect(H2C_DOMAIN, ["h2", "http/1.1"])
            assert chosen == "h2"
            frames = H2_PREFACE + bytes(range(256)) * 64  # not HTTP/1.1 in any way
            writer.write(frames)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(frames) + 12), 10)
            assert echoed.startswith(b"from-target:")
            assert bytes(received[: len(frames)]) == frames  # untouched, no headers added
            writer.close()
            exposition = generate_latest(stats.registry()).decode()
            assert (
                f'kakuremichi_gateway_http2_connections_total{{tunnel="{H2C_DOMAIN}"}} 1.0'
                in exposition
            )

            reader, writer, chosen = await connect(H2C_DOMAIN, ["http/1.1"])
            assert chosen is None
            writer.write(request("/", host=H2C_DOMAIN))
            status, _, body = await read_response(reader)
            assert status == 505 and b"HTTP/2" in body
            writer.close()

            _, writer, chosen = await connect(DOMAIN, ["h2", "http/1.1"])
            assert chosen == "http/1.1"
            writer.close()
        finally:
            server.close()
            proxy.close_all()
            relay.close_all()
            relay_server.close()
            target_server.close()

    asyncio.run(scenario())


def test_a_chunked_request_reaches_the_target_with_its_trailers() -> None:
    """Trailers of a chunked request body (e.g. a checksum sent after the data) arrive at the
    target, but for fields a trailer must not carry and X-Forwarded-* ones."""

    async def scenario() -> None:
        received = bytearray()
        complete = asyncio.Event()

        async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(65536):
                received.extend(chunk)
                if b"\r\n0\r\n" in received and received.endswith(b"\r\n\r\n"):
                    complete.set()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            writer.close()

        target_server = await asyncio.start_server(target, "127.0.0.1", 0)
        target_port = target_server.sockets[0].getsockname()[1]
        async with stack() as made:
            made.relay.set_targets({DOMAIN: AgentTarget(f"localhost:{target_port}")})
            reader, writer = await made.connect()
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n"
                b"Transfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Sum: 42\r\nHost: elsewhere.example.com\r\n"
                b"X-Forwarded-For: 6.6.6.6\r\nX-Other: 1\r\n\r\n"
            )
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"ok")
            await asyncio.wait_for(complete.wait(), 5)
            writer.close()
        target_server.close()
        assert received.endswith(b"3\r\nabc\r\n0\r\nX-Sum: 42\r\nX-Other: 1\r\n\r\n"), received

    asyncio.run(scenario())


def test_the_relay_takes_only_its_gateways_and_drops_one_removed_from_the_config() -> None:
    """Anyone who can reach the agent's relay port (a LAN neighbour, a pod on the same bridge)
    but is not a gateway of its config is refused; a gateway removed loses its connection."""

    async def scenario() -> None:
        async with stack() as s:
            s.relay.set_gateways({"127.0.0.2"})  # the gateway here connects from 127.0.0.1
            reader, writer = await s.connect()
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 502
            assert s.agent_stats.errors["relay_refused"] == 1
            assert s.agent_stats.connections_total == 0  # no stream, no target connection
            s.relay.set_gateways({"127.0.0.1"})
            reader, writer = await s.connect()
            writer.write(request("/"))
            assert (await read_response(reader))[0] == 200
            assert len(s.relay.connections) == 1
            s.relay.set_gateways({"127.0.0.2"})  # dropped from the config: at once
            assert all(c.transport is None or c.transport.is_closing()
                       for c in s.relay.connections)  # fmt: skip
            await asyncio.sleep(0.1)
            assert s.relay.connections == set()

    run(scenario)
