"""TCP, UDP and TLS-passthrough Tunnels through the gateway's ports and the agent's relays, wired
on loopback (no root, no WireGuard): what a client and a target see, and what a hostile client
or agent cannot make of them. The same paths over WireGuard, with real servers and clients, are
in ``tests/e2e/test_l4_tunnels.py``."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import pytest

from kakuremichi.api.resources import ClientLimits
from kakuremichi.edge import agent_datagrams, proxy_header, udp_frames
from kakuremichi.edge.agent_datagrams import AgentDatagrams
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy
from kakuremichi.edge.public_ports import PublicPorts
from kakuremichi.edge.stats import EdgeStats
from tests.infra.front_end import serve_https
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA


def scenario(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """The test's coroutine, run on a loop of its own within 60 s."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


AGENT_IP = "127.0.0.2"  # the agent's relay (TCP and UDP) listens here
GATEWAY_PUBLIC = "203.0.113.9"


@dataclass
class Origin:
    """A TCP target that echoes, upper-cased, and records the first bytes of each connection."""

    port: int
    firsts: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # until the client's half-close (TLS has none: what the first read brings)
            data = await (reader.read(65536) if tls else reader.read())
            self.firsts.append(data)
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=tls)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, base)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(b"echo:" + data, addr)


@dataclass
class L4:
    proxy: HttpsProxy
    ports: PublicPorts
    relay: AgentRelay
    datagrams: AgentDatagrams
    gateway_stats: EdgeStats
    agent_stats: EdgeStats
    relay_port: int
    https_port: int
    ca: TestCA
    trusted: list[str] = field(default_factory=lambda: ["127.0.0.1/32"])

    async def serve(self, routes: list[GatewayRoute], targets: dict[str, AgentTarget]) -> None:
        self.relay.set_targets(targets)
        self.datagrams.set_tunnels(targets)
        self.proxy.set_routes({r.domain: r for r in routes})
        await self.ports.apply(routes, self.proxy.limits, self.trusted)


@asynccontextmanager
async def l4(limits: ClientLimits | None = None) -> AsyncIterator[L4]:
    gateway_stats, agent_stats = EdgeStats("gateway"), EdgeStats("agent")
    relay_port = free_port()
    relay = AgentRelay(agent_stats)
    relay.set_gateways({"127.0.0.1"})
    relay_server = await asyncio.get_running_loop().create_server(
        relay.protocol, AGENT_IP, relay_port
    )
    datagrams = AgentDatagrams(agent_stats, relay_port=relay_port)
    datagrams.set_gateways({"127.0.0.1": GATEWAY_PUBLIC})
    await datagrams.listen(AGENT_IP, None)
    proxy = HttpsProxy(gateway_stats, relay_port=relay_port)
    proxy.set_front_end(limits, ["127.0.0.1/32"])
    ports = PublicPorts(gateway_stats, proxy.splices, proxy.proxy_headers, "127.0.0.1", None,
                        relay_port)  # fmt: skip
    ca = TestCA()
    https, https_port = await serve_https(proxy, "web.example.com", ca.issue("web.example.com"))
    try:
        yield L4(proxy, ports, relay, datagrams, gateway_stats, agent_stats, relay_port,
                 https_port, ca)  # fmt: skip
    finally:
        https.close()
        ports.close_all()
        proxy.close_all()
        relay.close_all()
        datagrams.close_all()
        relay_server.close()


def tcp_route(name: str, port: int, client_address: bool = False) -> GatewayRoute:
    return GatewayRoute(
        domain=name, agent_ip=AGENT_IP, protocol="TCP", port=port, client_address=client_address
    )


async def exchange(port: int, payload: bytes, first: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
    writer.write(payload)
    writer.write_eof()  # half-close: the answer still comes back
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


# --- TCP ------------------------------------------------------------------------------------------


@scenario
async def test_a_tcp_tunnel_carries_a_connection_both_ways_with_half_close() -> None:
    async with l4() as stack:
        target = Origin(free_port())
        await target.start()
        public = free_port()
        await stack.serve([tcp_route("db.example.com", public)],
                          {"db.example.com": AgentTarget(f"127.0.0.1:{target.port}", "TCP",
                                                         port=public)})  # fmt: skip
        big = bytes(range(256)) * 4096  # 1 MiB: more than a stream's window
        assert await exchange(public, big) == big.upper()
        assert stack.gateway_stats.tunnel_connections["db.example.com"] == 1
        assert stack.gateway_stats.received_bytes["db.example.com"] == len(big)


@pytest.mark.parametrize("version", ["V1", "V2"])
@scenario
async def test_the_target_is_told_the_clients_address_in_a_proxy_header(version: str) -> None:
    async with l4() as stack:
        target = Origin(free_port())
        await target.start()
        public = free_port()
        await stack.serve(
            [tcp_route("db.example.com", public, client_address=True)],
            {"db.example.com": AgentTarget(f"127.0.0.1:{target.port}", "TCP", version, public)},  # type: ignore[arg-type]
        )
        assert (await exchange(public, b"hello")).endswith(b"HELLO")  # (the header echoed too)
        header = proxy_header.parse(target.firsts[0])
        assert header is not None
        assert header.source is not None and header.source[0] == "127.0.0.1"
        assert header.destination == ("127.0.0.1", public)
        assert target.firsts[0][header.length :] == b"hello"


@scenario
async def test_a_load_balancers_proxy_header_is_believed_and_a_clients_is_refused() -> None:
    """acceptProxyProtocol: 127.0.0.1 is the trusted load balancer here. Its header's client
    reaches the target's own PROXY header; a connection from elsewhere that begins with a
    header is refused (a client posing as the load balancer)."""
    async with l4() as stack:
        stack.proxy.set_front_end(None, ["127.0.0.1/32"], accept_proxy_protocol=True)
        target = Origin(free_port())
        await target.start()
        public = free_port()
        await stack.serve(
            [tcp_route("db.example.com", public, client_address=True)],
            {"db.example.com": AgentTarget(f"127.0.0.1:{target.port}", "TCP", "V2", public)},
        )
        said = proxy_header.encode("V1", ("198.51.100.23", 50000), ("203.0.113.9", public))
        assert (await exchange(public, b"via lb", first=said)).endswith(b"VIA LB")
        header = proxy_header.parse(target.firsts[-1])
        assert header is not None and header.source == ("198.51.100.23", 50000)
        # Without a header, the trusted load balancer's connection is refused.
        assert await exchange(public, b"no header") == b""
        assert stack.gateway_stats.limit_hits["proxy_header"] >= 1
        # Anyone else is screened: not trusted now, and posing with a header.
        stack.proxy.set_front_end(None, ["10.9.9.9/32"], accept_proxy_protocol=True)
        await stack.ports.apply(list(stack.ports.routes.values()), None, ["10.9.9.9/32"])
        hits = stack.gateway_stats.limit_hits["proxy_header"]
        assert await exchange(public, b"forged", first=said) == b""
        assert stack.gateway_stats.limit_hits["proxy_header"] == hits + 1
        assert all(b"198.51.100.23" not in f for f in target.firsts[1:])
        assert (await exchange(public, b"plain")).endswith(b"PLAIN")  # an honest one is served


@scenario
async def test_a_port_in_use_is_reported_and_taken_once_free() -> None:
    async with l4() as stack:
        public = free_port()
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", public))
        squatter.listen()
        target = AgentTarget("127.0.0.1:1", "TCP", port=public)
        await stack.serve([tcp_route("db.example.com", public)], {"db.example.com": target})
        assert list(stack.ports.unavailable) == [("TCP", public)]
        squatter.close()
        assert await stack.ports.bind_missing() is True
        assert stack.ports.unavailable == {}


# --- TLS passthrough ----------------------------------------------------------------------------


@scenario
async def test_a_tls_tunnel_is_passed_through_by_name_and_others_are_the_gateways() -> None:
    async with l4() as stack:
        own = stack.ca.issue("vault.example.com")  # the origin's own certificate
        origin_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert, key = _files(own.certificate_pem, own.private_key_pem)
        origin_tls.load_cert_chain(cert, key)
        target = Origin(free_port())
        await target.start(origin_tls)
        vault = GatewayRoute(domain="vault.example.com", agent_ip=AGENT_IP, protocol="TLS")
        web = GatewayRoute(domain="web.example.com", agent_ip=AGENT_IP)
        await stack.serve([vault, web], {
            "vault.example.com": AgentTarget(f"127.0.0.1:{target.port}", "TLS"),
        })  # fmt: skip
        client_tls = ssl.create_default_context(cadata=stack.ca.pem)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.https_port, ssl=client_tls, server_hostname="vault.example.com"
        )
        peer = writer.get_extra_info("ssl_object").getpeercert()
        assert ("DNS", "vault.example.com") in peer["subjectAltName"]  # the origin's own
        writer.write(b"secret")
        assert await asyncio.wait_for(reader.read(), 10) == b"SECRET"
        writer.close()
        # The gateway's own TLS still serves HTTP tunnels' names.
        _, other = await asyncio.open_connection(
            "127.0.0.1", stack.https_port, ssl=client_tls, server_hostname="web.example.com"
        )
        assert ("DNS", "web.example.com") in other.get_extra_info("ssl_object").getpeercert()[
            "subjectAltName"
        ]
        other.close()
        assert stack.gateway_stats.tunnel_connections["vault.example.com"] == 1


# --- UDP ------------------------------------------------------------------------------------------


async def udp_client(port: int) -> tuple[asyncio.DatagramTransport, asyncio.Queue[bytes]]:
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answers.put_nowait(data)

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Client, remote_addr=("127.0.0.1", port)
    )
    return transport, answers


async def udp_stack(stack: L4, proxy_protocol: str = "None") -> tuple[int, UdpEcho]:
    echo = UdpEcho()
    echo_port = free_port()
    await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: echo, local_addr=("127.0.0.1", echo_port)
    )
    public = free_port()
    route = GatewayRoute(domain="dns.example.com", agent_ip=AGENT_IP, protocol="UDP", port=public)
    await stack.serve([route], {"dns.example.com": AgentTarget(
        f"127.0.0.1:{echo_port}", "UDP", proxy_protocol, public)})  # type: ignore[arg-type]  # fmt: skip
    return public, echo


@scenario
async def test_udp_datagrams_reach_the_target_and_answers_find_each_client() -> None:
    async with l4() as stack:
        public, echo = await udp_stack(stack)
        one, one_answers = await udp_client(public)
        two, two_answers = await udp_client(public)
        one.sendto(b"first")
        two.sendto(b"second")
        assert await asyncio.wait_for(one_answers.get(), 5) == b"echo:first"
        assert await asyncio.wait_for(two_answers.get(), 5) == b"echo:second"
        assert len({addr for _, addr in echo.seen}) == 2  # a socket per client at the target
        assert stack.gateway_stats.datagrams_in["dns.example.com"] == 2
        assert stack.gateway_stats.datagrams_out["dns.example.com"] == 2
        one.close()
        two.close()


@scenario
async def test_udp_proxy_v2_header_carries_the_client_in_every_datagram() -> None:
    async with l4() as stack:
        public, echo = await udp_stack(stack, "V2")
        client, answers = await udp_client(public)
        client.sendto(b"q1")
        client.sendto(b"q2")
        for _ in range(2):
            await asyncio.wait_for(answers.get(), 5)
        for data, _ in echo.seen:
            header = proxy_header.parse(data)
            assert header is not None
            assert header.source == ("127.0.0.1", client.get_extra_info("sockname")[1])
            assert header.destination == (GATEWAY_PUBLIC, public)
        assert sorted(d[proxy_header.parse(d).length :] for d, _ in echo.seen) == [b"q1", b"q2"]  # type: ignore[union-attr]
        client.close()


@scenario
async def test_too_large_datagrams_are_dropped_and_a_full_flow_table_takes_new_clients() -> None:
    async with l4(ClientLimits(max_udp_flows=1)) as stack:
        public, _ = await udp_stack(stack)
        one, answers = await udp_client(public)
        one.sendto(b"x" * (udp_frames.max_datagram("127.0.0.1") + 1))
        one.sendto(b"fits")
        assert await asyncio.wait_for(answers.get(), 5) == b"echo:fits"
        two, two_answers = await udp_client(public)
        two.sendto(b"over the cap")  # the table is full: the flow heard from longest ago goes
        assert await asyncio.wait_for(two_answers.get(), 5) == b"echo:over the cap"
        dropped = stack.gateway_stats.dropped
        assert dropped["dns.example.com/too_large"] == 1
        assert dropped["dns.example.com/flow_evicted"] == 1
        assert list(stack.ports.udp[public].flows) == [
            ("127.0.0.1", two.get_extra_info("sockname")[1])
        ]
        one.close()
        two.close()


@scenario
async def test_an_agent_cannot_make_the_gateway_send_to_anyone_it_chose() -> None:
    """A frame claiming to answer a client the gateway never heard from (a reflection or
    amplification attempt by a compromised agent), or a flow of another agent, goes nowhere."""
    async with l4() as stack:
        public, _ = await udp_stack(stack)
        victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        victim.bind(("127.0.0.1", 0))
        victim.settimeout(0.3)
        forged = udp_frames.encode(public, ("127.0.0.1", victim.getsockname()[1]), b"flood")
        # From the agent's own relay socket (a compromised agent), and from elsewhere.
        assert stack.datagrams.transport is not None
        stack.datagrams.transport.sendto(forged, ("127.0.0.1", stack.relay_port))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((AGENT_IP, 0))
        sender.sendto(forged, ("127.0.0.1", stack.relay_port))
        await asyncio.sleep(0.3)  # (the loop handles both)
        victim.setblocking(False)
        with pytest.raises(BlockingIOError):
            victim.recv(100)
        assert stack.gateway_stats.dropped["dns.example.com/no_flow"] == 1
        assert stack.gateway_stats.errors["udp_frame"] == 1
        victim.close()
        sender.close()


def _files(certificate: str, key: str) -> tuple[str, str]:
    import tempfile

    folder = tempfile.mkdtemp()
    with open(f"{folder}/c.pem", "w") as c, open(f"{folder}/k.pem", "w") as k:
        c.write(certificate)
        k.write(key)
    return f"{folder}/c.pem", f"{folder}/k.pem"


@scenario
async def test_an_agent_cannot_flood_a_client_that_no_longer_speaks() -> None:
    """After one datagram of its client, a flow carries at most 64 answers (a compromised agent
    answering a forged address would otherwise flood it); the agent's answers do not keep the
    flow alive either."""
    async with l4() as stack:
        public, _ = await udp_stack(stack)
        client, answers = await udp_client(public)
        client.sendto(b"one question")
        assert await asyncio.wait_for(answers.get(), 5) == b"echo:one question"
        me = ("127.0.0.1", client.get_extra_info("sockname")[1])
        assert stack.datagrams.transport is not None
        for number in range(100):
            frame = udp_frames.encode(public, me, b"unasked %d" % number)
            stack.datagrams.transport.sendto(frame, ("127.0.0.1", stack.relay_port))
        await asyncio.sleep(0.3)
        assert answers.qsize() == 63  # (64 in all, the echo among them)
        assert stack.gateway_stats.dropped["dns.example.com/answer_budget"] == 37
        client.close()


@scenario
async def test_one_host_cannot_take_all_of_a_udp_tunnels_flows() -> None:
    async with l4(ClientLimits(max_udp_flows=8, max_udp_flows_per_address=3)) as stack:
        stack.proxy.set_front_end(stack.proxy.limits, [])  # (loopback is no trusted proxy now)
        stack.trusted = []
        public, _ = await udp_stack(stack)
        clients = [await udp_client(public) for _ in range(4)]
        for transport, _ in clients:
            transport.sendto(b"hi")
        await asyncio.sleep(0.3)
        assert sum(q.qsize() for _, q in clients) == 3
        assert stack.gateway_stats.dropped["dns.example.com/flow_cap_per_address"] == 1
        for transport, _ in clients:
            transport.close()


@scenario
async def test_answers_are_budgeted_in_bytes_too() -> None:
    """A 12-byte datagram buys at most 4096 bytes of answers (udpAnswerBytes): an agent cannot
    turn one small forged datagram into a flood from the gateway's address."""
    async with l4() as stack:
        public, _ = await udp_stack(stack)
        client, answers = await udp_client(public)
        client.sendto(b"twelve bytes")
        assert await asyncio.wait_for(answers.get(), 5) == b"echo:twelve bytes"  # 17 bytes
        me = ("127.0.0.1", client.get_extra_info("sockname")[1])
        assert stack.datagrams.transport is not None
        for _ in range(10):
            frame = udp_frames.encode(public, me, b"x" * 1300)
            stack.datagrams.transport.sendto(frame, ("127.0.0.1", stack.relay_port))
        await asyncio.sleep(0.3)
        assert answers.qsize() == 3  # 17 + 3 x 1300 <= 4096 < 17 + 4 x 1300
        client.close()


@scenario
async def test_a_flow_whose_client_falls_silent_is_forgotten_and_one_that_speaks_is_kept() -> None:
    async with l4() as stack:
        public, _ = await udp_stack(stack)
        quiet, quiet_answers = await udp_client(public)
        talker, talker_answers = await udp_client(public)
        quiet.sendto(b"once")
        await asyncio.wait_for(quiet_answers.get(), 5)
        talker.sendto(b"again")
        await asyncio.wait_for(talker_answers.get(), 5)
        port = stack.ports.udp[public]
        port.flows[("127.0.0.1", talker.get_extra_info("sockname")[1])].last_active += 30
        port.sweep(time.monotonic() + 61)  # past the quiet one's 60 s, not the talker's
        assert list(port.flows) == [("127.0.0.1", talker.get_extra_info("sockname")[1])]
        assert sum(port.by_address.values()) == 1
        quiet.close()
        talker.close()


@scenario
async def test_udp_flows_of_a_route_backend_spread_across_its_endpoints_and_follow_them() -> None:
    """A UDPRoute's port: each new client's flow goes to the next ready endpoint; an endpoint
    that leaves its backend takes its flows with it (the client's next datagram starts a flow
    to one still there), and the others go on untouched; no endpoint ready: dropped."""
    async with l4() as stack:
        echoes, places = [], []
        for _ in range(2):
            echo, port = UdpEcho(), free_port()
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda echo=echo: echo,  # type: ignore[misc]
                local_addr=("127.0.0.1", port),
            )
            echoes.append(echo)
            places.append(f"127.0.0.1:{port}")
        public = free_port()
        route = GatewayRoute(domain="dns.example.com", agent_ip=AGENT_IP, protocol="UDP",
                             port=public)  # fmt: skip

        def target(*endpoints: str) -> dict[str, AgentTarget]:
            return {"dns.example.com": AgentTarget("127.0.0.1:1", "UDP", "None", public,
                                                   endpoints)}  # fmt: skip

        await stack.serve([route], target(*places))
        one, one_answers = await udp_client(public)
        two, two_answers = await udp_client(public)
        one.sendto(b"a")
        assert await asyncio.wait_for(one_answers.get(), 5) == b"echo:a"
        two.sendto(b"b")
        assert await asyncio.wait_for(two_answers.get(), 5) == b"echo:b"
        assert [len(e.seen) for e in echoes] == [1, 1]  # (one flow each)
        # The first endpoint leaves: its flow ends; the other's flow goes on.
        await stack.serve([route], target(places[1]))
        assert len(stack.datagrams.flows) == 1
        one.sendto(b"c")
        assert await asyncio.wait_for(one_answers.get(), 5) == b"echo:c"
        assert [len(e.seen) for e in echoes] == [1, 2]
        # None ready: the datagrams of a new flow are dropped, counted.
        await stack.serve([route], target())
        one.sendto(b"d")
        await asyncio.sleep(0.2)
        assert stack.agent_stats.dropped["dns.example.com/no_endpoint"] >= 1
        one.close()
        two.close()


@scenario
async def test_a_tcp_routes_connections_are_spread_over_its_backends_by_weight() -> None:
    """A TCPRoute with backends weighted 3 and 1, and a third (weight 1) that does not resolve:
    connections reach both backends, about three to one, and the unresolved share's are closed
    without reaching anyone (never shifted onto the others)."""
    async with l4() as stack:
        heavy, light = Origin(free_port()), Origin(free_port())
        await heavy.start()
        await light.start()
        public = free_port()
        places = (f"127.0.0.1:{heavy.port}",), (f"127.0.0.1:{light.port}",)
        target = AgentTarget(
            "127.0.0.1:1", "TCP", port=public, endpoints=tuple(sorted(p for (p,) in places)),
            shares=((places[0], 3), (places[1], 1), ((), 1)),
        )  # fmt: skip
        await stack.serve([tcp_route("db.example.com", public)], {"db.example.com": target})
        random.seed(21)  # (the agent draws by weight: the same draws every run)
        answers = [await exchange(public, b"x") for _ in range(200)]
        assert answers.count(b"X") == len(heavy.firsts) + len(light.firsts)
        assert answers.count(b"") == 200 - answers.count(b"X")  # (the refused share: closed)
        assert 95 <= len(heavy.firsts) <= 150 and 18 <= len(light.firsts) <= 65
        assert 18 <= answers.count(b"") <= 65


@scenario
async def test_a_flooded_port_crowds_out_only_itself_when_the_agents_flow_table_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cluster agent carries every tenant's UDPRoutes: when its flow table is full, the
    Tunnel with the most flows loses its oldest, so a port flooded from many sources never
    takes the flows of another, and the table stays within its bound."""
    monkeypatch.setattr(agent_datagrams, "MAX_FLOWS", 6)
    relay_port = free_port()
    datagrams = AgentDatagrams(EdgeStats("agent"), relay_port=relay_port)
    datagrams.set_gateways({"127.0.0.1": GATEWAY_PUBLIC})
    victim, flooded = free_port(), free_port()
    datagrams.set_tunnels({
        "dns.example.com": AgentTarget(f"127.0.0.1:{free_port()}", "UDP", port=victim),
        "flood.example.com": AgentTarget(f"127.0.0.1:{free_port()}", "UDP", port=flooded),
    })  # fmt: skip

    def send(port: int, client_port: int) -> None:
        frame = udp_frames.encode(port, ("198.51.100.7", client_port), b"q")
        datagrams.datagram_received(frame, ("127.0.0.1", relay_port))

    for client in (1, 2):
        send(victim, client)
    for client in range(100, 140):
        send(flooded, client)
    assert len(datagrams.flows) == 6
    assert {k[2][1] for k in datagrams.by_port[victim]} == {1, 2}  # (untouched)
    assert len(datagrams.by_port[flooded]) == 4
    send(victim, 3)  # a new client of the victim still gets in
    assert {k[2][1] for k in datagrams.by_port[victim]} == {1, 2, 3}
    assert datagrams.stats.dropped["flood.example.com/flow_evicted"] == 37
    assert not datagrams.stats.dropped["dns.example.com/flow_evicted"]
    datagrams.close_all()
