"""gRPC calls routed one by one at the gateway (a GRPCRoute's host with rules), on loopback with
real gRPC servers and clients (grpcio) behind the gateway's HTTPS port and the agent's relay:
what a client sees (each call at the backend its method and metadata choose, weights, header
edits, streams and trailers, UNIMPLEMENTED where no rule matches, UNAVAILABLE for a backend
without endpoints) and what a hostile client cannot do (reach a host its connection is not for,
name its own X-Forwarded-For, reset calls without end)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    WindowUpdated,
)

from kakuremichi.api.protocol import (
    CertificateBundle,
    HeaderEdits,
    HeaderMatch,
    HeaderPair,
    PathMatch,
    RequestMatch,
    RequestRule,
    WeightedBackend,
)
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.grpc_calls import CONNECTION_WINDOW
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.sni import SniContexts
from kakuremichi.edge.stats import EdgeStats
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA

HOST = "grpc.example.com"
SERVICE = "kakuremichi.test.Echo"
A, B, EMPTY = "shop/a:80", "shop/b:80", "shop/empty:80"


def backend_server(name: str) -> tuple[grpc.Server, int]:
    """A gRPC service (h2c) that says who it is, the metadata it got, and streams with
    trailers."""

    def say(request: bytes, context: Any) -> bytes:
        seen = dict(context.invocation_metadata())
        said = [name, request.decode()]
        said += [f"{key}={seen[key]}" for key in ("x-added", "x-forwarded-for") if key in seen]
        return " ".join(said).encode()

    def count(request: bytes, context: Any) -> Iterator[bytes]:
        for number in range(int(request)):
            yield f"{name}:{number}".encode()
        context.set_trailing_metadata((("x-counted", request.decode()),))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Other": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def rule(path: PathMatch | None, *backends: tuple[str, int], headers: dict[str, str] | None = None,
         edits: HeaderEdits | None = None) -> RequestRule:  # fmt: skip
    match = RequestMatch(
        path=path,
        headers=[HeaderMatch(name=k, value=v) for k, v in (headers or {}).items()] or None,
    )
    return RequestRule(
        matches=[match],
        backends=[WeightedBackend(stream=s, weight=w) for s, w in backends],
        request_headers=edits,
    )


RULES = (
    rule(PathMatch(type="Exact", value=f"/{SERVICE}/Say"), (B, 1),
         headers={"x-real-ip": "10.0.0.66"}),
    rule(PathMatch(type="Exact", value=f"/{SERVICE}/Say"), (B, 1), headers={"x-beta": "1"},
         edits=HeaderEdits(set=[HeaderPair(name="X-Added", value="by-rule")])),
    rule(PathMatch(type="Exact", value=f"/{SERVICE}/Say"), (A, 1)),
    rule(PathMatch(type="Exact", value=f"/{SERVICE}/Other"), (A, 3), (B, 1)),
    rule(PathMatch(type="Exact", value=f"/{SERVICE}/Gone"), (EMPTY, 1)),
    rule(PathMatch(type="PathPrefix", value=f"/{SERVICE}"), (A, 1)),
)  # fmt: skip


@dataclass
class Stack:
    https_port: int
    ca: TestCA
    stats: EdgeStats
    proxy: HttpsProxy

    def proxy_clients(self) -> list[Any]:
        return list(self.proxy.clients)

    def channel(self, name: str = HOST) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca.pem.encode())
        options = (("grpc.ssl_target_name_override", name), ("grpc.default_authority", name))
        return grpc.secure_channel(f"127.0.0.1:{self.https_port}", credentials, options=options)

    async def call(self, method: str, body: bytes = b"hi", metadata: dict[str, str] | None = None
                   ) -> str:  # fmt: skip
        def run() -> str:
            with self.channel() as channel:
                answer: bytes = channel.unary_unary(f"/{SERVICE}/{method}")(
                    body, timeout=10, metadata=tuple((metadata or {}).items()) or None
                )
                return answer.decode()

        return await asyncio.to_thread(run)


@asynccontextmanager
async def stack() -> AsyncIterator[Stack]:
    servers = [backend_server(name) for name in ("a", "b")]
    relay = AgentRelay(EdgeStats("agent"))
    relay.set_targets({
        A: AgentTarget("", endpoints=(f"127.0.0.1:{servers[0][1]}",)),
        B: AgentTarget("", endpoints=(f"127.0.0.1:{servers[1][1]}",)),
        EMPTY: AgentTarget("", endpoints=()),
    })  # fmt: skip
    relay.set_gateways({"127.0.0.1"})
    relay_port = free_port()
    loop = asyncio.get_running_loop()
    relay_server = await loop.create_server(relay.protocol, "127.0.0.1", relay_port)
    stats = EdgeStats("gateway")
    proxy = HttpsProxy(stats, relay_port=relay_port)
    proxy.set_routes({HOST: GatewayRoute(domain=HOST, agent_ip="127.0.0.1", h2c=True, rules=RULES)})
    ca = TestCA()
    issued = ca.issue(HOST, "other.example.com")
    bundle = CertificateBundle(domain=HOST, certificate=issued.certificate_pem,
                               private_key=issued.private_key_pem)  # fmt: skip
    sni = SniContexts()
    sni.install(sni.prepare([bundle], h2_domains={HOST}))
    https_port = free_port()
    server = await serve(proxy, sni.front, "127.0.0.1", https_port)
    try:
        yield Stack(https_port, ca, stats, proxy)
    finally:
        server.close()
        proxy.close_all()
        relay.close_all()
        relay_server.close()
        for grpc_server, _ in servers:
            grpc_server.stop(None)


def scenario(test: Callable[[Stack], Any]) -> None:
    async def run() -> None:
        async with stack() as made:
            await asyncio.wait_for(test(made), 60)

    asyncio.run(run())


def test_each_call_goes_where_its_method_and_metadata_say() -> None:
    async def test(s: Stack) -> None:
        assert await s.call("Say") == "a hi x-forwarded-for=127.0.0.1"
        # A header match wins (the rule's precedence), and its edit reaches the backend.
        assert await s.call("Say", metadata={"x-beta": "1"}) == (
            "b hi x-added=by-rule x-forwarded-for=127.0.0.1"
        )

        # Weights 3:1 over one connection: both backends answer.
        def several() -> set[str]:
            with s.channel() as channel:
                say = channel.unary_unary(f"/{SERVICE}/Other")
                return {say(b"x", timeout=10).decode().split()[0] for _ in range(40)}

        assert await asyncio.to_thread(several) == {"a", "b"}
        assert s.stats.http2_connections[HOST] >= 3

    scenario(test)


def test_a_stream_and_its_trailers_come_back_whole() -> None:
    async def test(s: Stack) -> None:
        def count() -> tuple[list[str], str]:
            with s.channel() as channel:
                call = channel.unary_stream(f"/{SERVICE}/Count")(b"50", timeout=10)
                messages = [m.decode() for m in call]
                return messages, dict(call.trailing_metadata())["x-counted"]

        messages, counted = await asyncio.to_thread(count)
        assert messages == [f"a:{n}" for n in range(50)] and counted == "50"
        # A large body each way passes with flow control end to end.
        big = b"x" * 3_000_000
        assert len(await s.call("Say", big)) == len("a ") + len(big) + len(
            " x-forwarded-for=127.0.0.1"
        )

    scenario(test)


def test_no_matching_rule_is_unimplemented_and_no_endpoint_is_unavailable() -> None:
    async def test(s: Stack) -> None:
        def code_of(path: str) -> grpc.StatusCode:
            with s.channel() as channel:
                try:
                    channel.unary_unary(path)(b"x", timeout=10)
                except grpc.RpcError as error:
                    return error.code()
            return grpc.StatusCode.OK

        assert await asyncio.to_thread(code_of, "/other.Service/Say") == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        assert await asyncio.to_thread(code_of, f"/{SERVICE}/Gone") == grpc.StatusCode.UNAVAILABLE
        # The backend's own status, in trailers-only form, comes back as it said it.
        assert await asyncio.to_thread(code_of, f"/{SERVICE}/Missing") == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        assert await s.call("Say") == "a hi x-forwarded-for=127.0.0.1"  # (the rest unharmed)

    scenario(test)


async def raw_h2(s: Stack) -> tuple[H2Connection, asyncio.StreamReader, asyncio.StreamWriter]:
    """An HTTP/2 client of its own making, over TLS to the host."""
    context = ssl.create_default_context(cadata=s.ca.pem)
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", s.https_port, ssl=context, server_hostname=HOST
    )
    connection = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    writer.write(connection.data_to_send())
    return connection, reader, writer


def request_headers(authority: bytes, **more: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", f"/{SERVICE}/Say".encode()),
        (b":authority", authority), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        *((k.replace("_", "-").encode(), v) for k, v in more.items()),
    ]  # fmt: skip


async def events_until(
    connection: H2Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    wanted: type,
) -> list[Any]:  # fmt: skip
    seen: list[Any] = []
    async with asyncio.timeout(10):
        while not any(isinstance(e, wanted) for e in seen):
            data = await reader.read(65536)
            if not data:
                break
            seen += connection.receive_data(data)
            writer.write(connection.data_to_send())
    return seen


def test_a_call_for_another_name_on_the_connection_is_misdirected() -> None:
    """The certificate names other.example.com too, so a client may reuse the connection for
    it: such a call is answered 421 and reaches no backend."""

    async def test(s: Stack) -> None:
        connection, reader, writer = await raw_h2(s)
        connection.send_headers(1, request_headers(b"other.example.com"), end_stream=True)
        writer.write(connection.data_to_send())
        seen = await events_until(connection, reader, writer, ResponseReceived)
        (answer,) = [e for e in seen if isinstance(e, ResponseReceived)]
        assert dict(answer.headers)[b":status"] == b"421"
        writer.close()

    scenario(test)


def test_a_client_that_keeps_resetting_calls_is_cut_off() -> None:
    """HTTP/2 "rapid reset": calls opened and reset at once cost the backends work the
    client never waits for; past a hundred a second the connection is closed."""

    async def test(s: Stack) -> None:
        connection, reader, writer = await raw_h2(s)
        for number in range(150):
            stream_id = 1 + 2 * number
            connection.send_headers(stream_id, request_headers(HOST.encode()))
            connection.reset_stream(stream_id)
        writer.write(connection.data_to_send())
        seen = await events_until(connection, reader, writer, ConnectionTerminated)
        assert any(isinstance(e, ConnectionTerminated) for e in seen)
        assert s.stats.limit_hits["http2_resets"] == 1
        assert await s.call("Say") == "a hi x-forwarded-for=127.0.0.1"  # (others unharmed)

    scenario(test)


@pytest.mark.parametrize("field", ["x_forwarded_for", "x_real_ip", "forwarded"])
def test_a_client_cannot_name_its_own_address(field: str) -> None:
    """Neither to the backend nor to the rules: one that matches ``x-real-ip: 10.0.0.66``
    (leading to b) is not reached by a client that says so."""

    async def test(s: Stack) -> None:
        def say() -> str:
            with s.channel() as channel:
                metadata = ((field.replace("_", "-"), "10.0.0.66"),)
                answer: bytes = channel.unary_unary(f"/{SERVICE}/Say")(
                    b"hi", timeout=10, metadata=metadata
                )
                return answer.decode()

        assert await asyncio.to_thread(say) == "a hi x-forwarded-for=127.0.0.1"

    scenario(test)


def test_a_client_that_pings_and_never_reads_is_cut_off() -> None:
    """Every PING is answered: a client that sends them without reading the answers would have
    them pile up at the gateway; once 1 MiB waits behind a stalled transport it is closed."""

    async def test(s: Stack) -> None:
        context = ssl.create_default_context(cadata=s.ca.pem)
        context.set_alpn_protocols(["h2"])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (it reads nothing anyway)
        sock.connect(("127.0.0.1", s.https_port))
        _reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=HOST
        )
        connection = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        for _ in range(6000):  # (the kernel's buffers take a few MiB first)
            for _ in range(200):
                connection.ping(b"12345678")
            writer.write(connection.data_to_send())
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                break  # (the gateway reads no more of it)
            if s.stats.limit_hits["http2_unread"]:
                break
        assert s.stats.limit_hits["http2_unread"] == 1
        writer.close()

    scenario(test)


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def headers_for(method: str) -> list[tuple[bytes, bytes]]:
    return [
        (k, f"/{SERVICE}/{method}".encode() if k == b":path" else v)
        for k, v in request_headers(HOST.encode())
    ]


async def read_until(
    connection: H2Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    done: Callable[[list[Any]], bool], acknowledge: Callable[[Any], bool] = lambda e: True,
    seconds: float = 5,
) -> list[Any]:  # fmt: skip
    """Events until ``done`` says so (or ``seconds``), data acknowledged where ``acknowledge``
    says."""
    seen: list[Any] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while not done(seen):
                data = await reader.read(65536)
                if not data:
                    break
                for event in connection.receive_data(data):
                    seen.append(event)
                    if isinstance(event, DataReceived) and acknowledge(event):
                        connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                writer.write(connection.data_to_send())
    return seen


def ended(stream_id: int) -> Callable[[list[Any]], bool]:
    return lambda seen: any(isinstance(e, StreamEnded) and e.stream_id == stream_id for e in seen)


def test_a_stream_its_client_stops_reading_holds_up_no_other_call() -> None:
    """A client that reads one server stream no further (gRPC's own backpressure): its other
    calls to the same backend still go, and once it resets that stream what was waiting is
    given back (the backend's window never shrinks for good)."""

    async def test(s: Stack) -> None:
        connection, reader, writer = await raw_h2(s)
        connection.increment_flow_control_window(50_000_000)
        connection.send_headers(1, headers_for("Count"))
        connection.send_data(1, grpc_message(b"200000"), end_stream=True)
        writer.write(connection.data_to_send())
        slow = lambda e: e.stream_id != 1  # noqa: E731
        await read_until(connection, reader, writer, lambda seen: False, slow, seconds=1.5)
        for stream_id in (3, 5, 7):
            connection.send_headers(stream_id, headers_for("Say"))
            connection.send_data(stream_id, grpc_message(b"hi"), end_stream=True)
            writer.write(connection.data_to_send())
            seen = await read_until(connection, reader, writer, ended(stream_id), slow)
            assert ended(stream_id)(seen), stream_id
            if stream_id == 3:
                connection.reset_stream(1)
        # What stream 1 had brought and the client never read is given back to the backend.
        (client,) = s.proxy_clients()
        links = list(client.calls.links.values())
        assert links and all(
            link.conn.inbound_flow_control_window > CONNECTION_WINDOW // 2 for link in links
        )
        writer.close()

    scenario(test)


def test_request_bodies_refused_mid_way_give_the_clients_window_back() -> None:
    """Uploads to a backend with no endpoint, again and again: each is answered UNAVAILABLE
    and the bytes it had sent are acknowledged, so the connection can still send a body."""

    async def test(s: Stack) -> None:
        connection, reader, writer = await raw_h2(s)
        stream_id = 1
        await read_until(connection, reader, writer,
                         lambda seen: any(isinstance(e, WindowUpdated) for e in seen))  # fmt: skip
        for _ in range(12):  # (two at once: the second waits for the backend's window)
            for upload in (stream_id, stream_id + 2):
                connection.send_headers(upload, headers_for("Gone"))
                for _ in range(4):
                    connection.send_data(upload, b"\0" * 15000)
            writer.write(connection.data_to_send())
            await read_until(connection, reader, writer, ended(stream_id + 2))
            stream_id += 4
        # (every byte of the refused bodies acknowledged: the gateway's window is whole)
        (client,) = s.proxy_clients()
        gateway_side = client.calls.conn
        assert gateway_side.inbound_flow_control_window > CONNECTION_WINDOW // 2
        connection.send_headers(stream_id, headers_for("Say"))
        connection.send_data(stream_id, grpc_message(b"still"), end_stream=True)
        writer.write(connection.data_to_send())
        seen = await read_until(connection, reader, writer, ended(stream_id))
        (answer,) = [e for e in seen if isinstance(e, DataReceived) and e.stream_id == stream_id]
        assert answer.data[5:].startswith(b"a still")
        writer.close()

    scenario(test)


def test_empty_data_frames_cost_nothing_held() -> None:
    """Zero-length DATA frames are free under flow control: none of them is kept."""

    async def test(s: Stack) -> None:
        connection, _reader, writer = await raw_h2(s)
        connection.send_headers(1, headers_for("Count"))
        writer.write(connection.data_to_send())
        await asyncio.sleep(0.2)
        for _ in range(20):
            for _ in range(5000):
                connection.send_data(1, b"")
            writer.write(connection.data_to_send())
            await writer.drain()
        await asyncio.sleep(0.2)
        (client,) = s.proxy_clients()
        call = client.calls.calls[1] if client.calls is not None else None
        assert call is not None and len(call.to_backend.items) <= 1
        writer.close()

    scenario(test)
