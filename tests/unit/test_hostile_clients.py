"""The gateway's HTTPS front end against hostile clients, on loopback (gateway proxy, agent relay
and an origin that behaves like real servers, :mod:`tests.infra.plain_origin`): no client's bytes
become part of another client's request, heads are bounded while they are read, an upgrade is
spliced only after 101, address headers are the gateway's alone, and the classic smuggling inputs
never reach the origin. (The same over WireGuard, with real processes and testssl.sh:
``tests/integration/test_gateway_hostile_clients.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from kakuremichi.api.resources import ClientLimits, Hsts
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy
from kakuremichi.edge.stats import EdgeStats
from tests.infra import plain_origin
from tests.infra.front_end import serve_https
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA

DOMAIN = "app.example.com"


@dataclass
class Stack:
    https_port: int
    proxy: HttpsProxy
    gateway_stats: EdgeStats
    agent_stats: EdgeStats
    client_tls: ssl.SSLContext
    seen: plain_origin.Seen

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", self.https_port, ssl=self.client_tls, server_hostname=DOMAIN
        )

    async def exchange(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """``raw`` on a new connection; its first response."""
        reader, writer = await self.connect()
        writer.write(raw)
        try:
            return await read_response(reader)
        finally:
            writer.close()

    def targets(self) -> list[str]:
        return [str(head["target"]) for head in self.seen.heads]


@asynccontextmanager
async def stack(limits: ClientLimits | None = None, hsts: Hsts | None = None,
                trusted: list[str] | None = None) -> AsyncIterator[Stack]:  # fmt: skip
    ca = TestCA()
    issued = ca.issue(DOMAIN)
    origin_port = free_port()
    origin, seen = await plain_origin.serve("127.0.0.1", origin_port)
    agent_stats, gateway_stats = EdgeStats("agent"), EdgeStats("gateway")
    relay = AgentRelay(agent_stats)
    relay.set_targets({DOMAIN: AgentTarget(f"127.0.0.1:{origin_port}")})
    relay.set_gateways({"127.0.0.1"})  # the gateway connects from loopback here
    relay_port = free_port()
    loop = asyncio.get_running_loop()
    relay_server = await loop.create_server(relay.protocol, "127.0.0.1", relay_port)
    proxy = HttpsProxy(gateway_stats, relay_port=relay_port)
    proxy.set_front_end(limits, trusted or [])
    proxy.set_routes({DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1", hsts=hsts)})
    server, https_port = await serve_https(proxy, DOMAIN, issued)
    sweeping = asyncio.create_task(proxy.sweep_forever(0.1))
    try:
        yield Stack(https_port, proxy, gateway_stats, agent_stats,
                    ssl.create_default_context(cadata=ca.pem), seen)  # fmt: skip
    finally:
        sweeping.cancel()
        server.close()
        proxy.close_all()
        relay.close_all()
        relay_server.close()
        origin.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    if status == 101:
        return status, headers, b""
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
    return status, headers, body


def get(path: str, extra: str = "", host: str = DOMAIN) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def eventually(condition: Callable[[], bool], seconds: int) -> bool:
    for _ in range(seconds * 10):
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


# --- response-queue poisoning ---------------------------------------------------------------


async def whoami(s: Stack, user: str) -> bytes:
    return (await s.exchange(get("/whoami", f"X-User: {user}\r\n")))[2]


def test_a_body_left_unfinished_after_an_early_answer_never_swallows_the_next_request() -> None:
    """The desync: the origin answers 401 before reading a body the attacker never finishes;
    were the stream reused, the next client's request would become the rest of that body and
    every later client would get the response meant for the one before."""

    async def scenario() -> None:
        async with stack() as s:
            assert await whoami(s, "warm-up") == b"you are warm-up"  # one stream in the pool
            for _round in range(3):
                reader, writer = await s.connect()
                writer.write(b"POST /early HTTP/1.1\r\nHost: " + DOMAIN.encode()
                             + b"\r\nContent-Length: 300\r\n\r\n" + b"x" * 20)  # fmt: skip
                assert (await read_response(reader))[0] == 401
                writer.close()  # ... and gone, 280 bytes short
                await asyncio.sleep(0.05)
                for user in ("victim", "bob", "carol"):
                    assert await whoami(s, user) == f"you are {user}".encode()

    run(scenario)


def test_an_early_answer_on_a_kept_alive_connection_moves_the_next_request_to_a_new_stream() -> (
    None
):
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(b"POST /early HTTP/1.1\r\nHost: " + DOMAIN.encode()
                         + b"\r\nContent-Length: 10\r\n\r\n")  # fmt: skip
            assert (await read_response(reader))[0] == 401
            writer.write(b"0123456789" + get("/whoami", "X-User: same\r\n"))
            assert (await read_response(reader))[2] == b"you are same"
            writer.close()
            assert await whoami(s, "next") == b"you are next"

    run(scenario)


def test_a_request_refused_mid_body_and_an_idle_close_leave_no_stream_behind() -> None:
    async def scenario() -> None:
        limits = ClientLimits.model_construct(keep_alive_timeout_seconds=0.5)
        async with stack(limits) as s:
            assert await whoami(s, "warm-up") == b"you are warm-up"
            # 400 in the middle of a chunked body (its second chunk size is not hex)
            reader, writer = await s.connect()
            writer.write(b"POST /headers HTTP/1.1\r\nHost: " + DOMAIN.encode()
                         + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")  # fmt: skip
            await asyncio.sleep(0.1)
            writer.write(b"zz\r\n")
            assert (await read_response(reader))[0] == 400
            writer.close()
            assert await whoami(s, "after-400") == b"you are after-400"
            # half a body, then silence until the idle close
            reader, writer = await s.connect()
            writer.write(b"POST /headers HTTP/1.1\r\nHost: " + DOMAIN.encode()
                         + b"\r\nContent-Length: 100\r\n\r\nabc")  # fmt: skip
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
            assert await whoami(s, "after-idle") == b"you are after-idle"
            assert s.gateway_stats.limit_hits["keep_alive_timeout"] >= 1

    run(scenario)


# --- bounded heads --------------------------------------------------------------------------


async def stream_until_answered(s: Stack, start: bytes, filler: bytes) -> tuple[int, int]:
    """Send ``start`` then ``filler`` over and over (up to 20 MiB) while reading: the status of
    the answer and how many bytes had been sent when it came."""
    reader, writer = await s.connect()
    writer.write(start)
    sent = len(start)
    answer: asyncio.Task[tuple[int, dict[str, str], bytes]] = asyncio.create_task(
        read_response(reader)
    )
    try:
        while not answer.done() and sent < 20 * 1024 * 1024:
            writer.write(filler)
            sent += len(filler)
            try:
                await asyncio.wait_for(writer.drain(), 1)
            except (ConnectionError, TimeoutError):
                break
        status = (await asyncio.wait_for(answer, 5))[0]
    finally:
        writer.close()
    return status, sent


@pytest.mark.parametrize(
    ("start", "filler", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: app.example.com\r\n",
            b"X-Filler: " + b"a" * 1000 + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Long: ", b"b" * 4096, 431),
        (b"GET /", b"c" * 4096, 414),
    ],
    ids=["many-lines", "one-long-value", "long-target"],
)
def test_an_endless_head_is_refused_at_its_limit(start: bytes, filler: bytes, status: int) -> None:
    async def scenario() -> None:
        async with stack() as s:
            loop = asyncio.get_running_loop()
            began = loop.time()
            got, sent = await stream_until_answered(s, start, filler)
            assert got == status
            assert loop.time() - began < 2
            assert sent < 2 * 1024 * 1024  # answered long before the 20 MiB were out
            assert s.seen.heads == []

    run(scenario)


def test_more_header_fields_than_allowed_get_431() -> None:
    async def scenario() -> None:
        async with stack() as s:
            fields = "".join(f"X-F{i}: v\r\n" for i in range(101))
            assert (await s.exchange(get("/", fields)))[0] == 431
            assert (await s.exchange(get("/", fields[: fields.index("X-F98")])))[0] == 200
            assert s.gateway_stats.limit_hits["max_header_fields"] == 1

    run(scenario)


def test_a_head_fed_slowly_is_closed_at_its_deadline() -> None:
    async def scenario() -> None:
        async with stack(ClientLimits.model_construct(head_timeout_seconds=1.0)) as s:
            reader, writer = await s.connect()
            loop = asyncio.get_running_loop()
            began = loop.time()
            closed = asyncio.create_task(reader.read())
            for byte in b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Slow: ":
                if closed.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            answer = await asyncio.wait_for(closed, 5)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert loop.time() - began < 2
            # bare CRLFs (skipped by HTTP parsers) do not keep a connection either
            reader, writer = await s.connect()
            closed = asyncio.create_task(reader.read())
            while not closed.done() and loop.time() - began < 10:
                writer.write(b"\r\n")
                await asyncio.sleep(0.1)
            assert (await asyncio.wait_for(closed, 5)).startswith(b"HTTP/1.1 408 ")
            assert s.gateway_stats.limit_hits["head_timeout"] == 2

    run(scenario)


def test_connections_are_capped_per_client_address_and_in_total() -> None:
    async def scenario() -> None:
        limits = ClientLimits.model_construct(max_connections_per_address=3, max_connections=5)
        async with stack(limits) as s:
            held = [await s.connect() for _ in range(3)]
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await s.connect()  # refused before the handshake
            assert s.gateway_stats.limit_hits["max_connections_per_address"] == 1
            held.pop()[1].close()
            await asyncio.sleep(0.2)
            assert (await s.exchange(get("/")))[0] == 200  # a place came free
            s.proxy.set_front_end(
                ClientLimits.model_construct(max_connections_per_address=10, max_connections=3),
                [],
            )
            held.append(await s.connect())
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await s.connect()
            assert s.gateway_stats.limit_hits["max_connections"] == 1
            for _, writer in held:
                writer.close()

    run(scenario)


# --- upgrades -------------------------------------------------------------------------------

UPGRADE = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"


def test_an_upgrade_the_origin_refuses_keeps_every_check_on_the_next_requests() -> None:
    async def scenario() -> None:
        async with stack() as s:
            s.proxy.routes["other.example.com"] = GatewayRoute(
                domain="other.example.com", agent_ip="127.0.0.1"
            )
            reader, writer = await s.connect()
            # The refused upgrade and, right behind it, a request that would pass the
            # gateway's checks only if the connection had become raw bytes.
            writer.write(get("/ws", UPGRADE) + get("/headers", "X-Real-IP: 6.6.6.6\r\n",
                                                   host="other.example.com"))  # fmt: skip
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"no upgrades here\n")
            status, _, _ = await read_response(reader)
            assert status == 421  # the Host check applied
            writer.close()
            reader, writer = await s.connect()
            writer.write(get("/ws", UPGRADE))
            assert (await read_response(reader))[0] == 200
            writer.write(get("/headers", "X-Real-IP: 6.6.6.6\r\n"))
            head = json.loads((await read_response(reader))[2])
            assert ["X-Real-IP", "127.0.0.1"] in head["headers"]
            assert ["X-Real-IP", "6.6.6.6"] not in head["headers"]
            assert s.targets() == ["/ws", "/ws", "/headers"]

    run(scenario)


def test_an_upgrade_is_spliced_once_the_origin_answers_101() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(get("/ws-ok", UPGRADE) + b"early bytes")
            status, headers, _ = await read_response(reader)
            assert status == 101 and headers["upgrade"] == "websocket"
            assert await asyncio.wait_for(reader.readexactly(17), 5) == b"echo: early bytes"
            writer.write(b"more")
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b"echo: more"

    run(scenario)


# --- header hygiene -------------------------------------------------------------------------


def test_address_and_hop_by_hop_fields_are_the_gateways_alone() -> None:
    async def scenario() -> None:
        async with stack() as s:
            spoof = (
                "X-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n"
                "True-Client-IP: 1.2.3.4\r\nX_Real_IP: 1.2.3.4\r\nX_Forwarded_For: 1.2.3.4\r\n"
                "X-Forwarded-Host: evil.example\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                "Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Api-Key, "
                "X-Forwarded-For\r\nX-Api-Key: secret\r\nX-Kept: yes\r\n"
            )
            status, _, body = await s.exchange(get("/headers", spoof))
            assert status == 200
            headers = json.loads(body)["headers"]
            names = [name.lower() for name, _ in headers]
            for gone in (
                "forwarded",
                "true-client-ip",
                "x_real_ip",
                "x_forwarded_for",
                "keep-alive",
                "te",
                "proxy-connection",
                "connection",
                "x-api-key",
            ):
                assert gone not in names, gone
            assert ["X-Kept", "yes"] in headers
            assert ["X-Forwarded-For", "127.0.0.1"] in headers
            assert ["X-Real-IP", "127.0.0.1"] in headers
            assert ["X-Forwarded-Host", DOMAIN] in headers
            assert names.count("x-forwarded-for") == names.count("x-real-ip") == 1

    run(scenario)


def test_a_trusted_proxys_forwarded_for_is_appended_to() -> None:
    async def scenario() -> None:
        async with stack(trusted=["127.0.0.0/8"]) as s:
            extra = "X-Forwarded-For: 203.0.113.7, 127.0.0.9\r\n"
            headers = json.loads((await s.exchange(get("/headers", extra)))[2])["headers"]
            assert ["X-Forwarded-For", "203.0.113.7, 127.0.0.9, 127.0.0.1"] in headers
            assert ["X-Real-IP", "203.0.113.7"] in headers
        async with stack(trusted=["10.0.0.0/8"]) as s:  # the client is not a trusted proxy
            headers = json.loads((await s.exchange(get("/headers", extra)))[2])["headers"]
            assert ["X-Forwarded-For", "127.0.0.1"] in headers

    run(scenario)


H = f"Host: {DOMAIN}\r\n"
REFUSED = [
    ("two-hosts", f"GET / HTTP/1.1\r\n{H}{H}\r\n"),
    ("no-host", "GET / HTTP/1.1\r\n\r\n"),
    ("absolute-other-host", f"GET http://other.example.com/ HTTP/1.1\r\n{H}\r\n"),
    ("absolute-userinfo", f"GET http://x@{DOMAIN}/ HTTP/1.1\r\n{H}\r\n"),
    ("http-0.9", "GET /\r\n\r\n"),
    ("http-2.0-line", f"GET / HTTP/2.0\r\n{H}\r\n"),
    ("te-gzip", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: gzip\r\n\r\nabc"),
    ("te-chunked-gzip", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked, gzip\r\n\r\n"),
    ("te-on-1.0", f"POST / HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    (
        "te-identity-chunked",
        f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    ),
    ("relative-target", f"GET index.html HTTP/1.1\r\n{H}\r\n"),
    # the classic smuggling corpus
    (
        "cl-te",
        f"POST / HTTP/1.1\r\n{H}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    ),
    (
        "te-cl",
        f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        "8\r\nSMUGGLED\r\n0\r\n\r\n",
    ),
    (
        "two-content-lengths",
        f"POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    ),
    ("content-length-list", f"POST / HTTP/1.1\r\n{H}Content-Length: 5, 5\r\n\r\nabcde"),
    ("content-length-plus", f"POST / HTTP/1.1\r\n{H}Content-Length: +5\r\n\r\nabcde"),
    ("content-length-hex", f"POST / HTTP/1.1\r\n{H}Content-Length: 0x5\r\n\r\nabcde"),
    (
        "te-space-before-colon",
        f"POST / HTTP/1.1\r\n{H}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    ),
    ("te-obs-fold", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: x\r\n chunked\r\n\r\n0\r\n\r\n"),
    ("te-xchunked", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("te-tab-chunked", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding:\tchunked\x0b\r\n\r\n0\r\n\r\n"),
    ("bare-lf", f"GET / HTTP/1.1\n{H}\n"),
    ("lf-in-header", f"GET / HTTP/1.1\r\n{H}X-A: b\nX-B: c\r\n\r\n"),
    ("nul-in-value", f"GET / HTTP/1.1\r\n{H}X-A: b\x00c\r\n\r\n"),
    ("space-in-target", f"GET /a b HTTP/1.1\r\n{H}\r\n"),
    ("connect", f"CONNECT {DOMAIN}:443 HTTP/1.1\r\n{H}\r\n"),
]


@pytest.mark.parametrize("raw", [r for _, r in REFUSED], ids=[name for name, _ in REFUSED])
def test_a_malformed_or_ambiguous_request_is_refused_before_anything_reaches_the_origin(
    raw: str,
) -> None:
    async def scenario() -> None:
        async with stack() as s:
            status, headers, _ = await s.exchange(raw.encode())
            assert 400 <= status < 500 and headers["connection"] == "close"
            await asyncio.sleep(0.05)
            assert s.seen.heads == []
            assert s.agent_stats.connections_total == 0

    run(scenario)


CHUNKED = f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
BAD_BODIES = [
    ("chunk-size-negative", CHUNKED + "-1\r\n"),
    ("chunk-size-0x", CHUNKED + "0x5\r\nhello"),
    ("chunk-size-overflow", CHUNKED + "ffffffffffffffffff\r\n"),
    ("chunk-without-crlf", CHUNKED + "3\r\nabcX"),
]


@pytest.mark.parametrize("raw", [r for _, r in BAD_BODIES], ids=[name for name, _ in BAD_BODIES])
def test_a_bad_chunked_body_is_refused_and_its_stream_carries_nothing_more(raw: str) -> None:
    """The head was sound and went on; the body turns out malformed: 400, and the stream it
    went on is closed with it (whatever followed can never reach the origin as a request)."""

    async def scenario() -> None:
        async with stack() as s:
            status, _, _ = await s.exchange(raw.encode() + get("/smuggled"))
            assert status == 400
            assert await whoami(s, "next") == b"you are next"
            assert "/smuggled" not in s.targets()

    run(scenario)


def test_an_absolute_form_target_for_this_host_goes_on_in_origin_form() -> None:
    async def scenario() -> None:
        async with stack() as s:
            status, _, _ = await s.exchange(get(f"https://{DOMAIN.upper()}:443/headers?q=1"))
            assert status == 200
            assert s.targets() == ["/headers?q=1"]

    run(scenario)


def test_what_a_client_sent_is_escaped_in_the_gateways_pages() -> None:
    async def scenario() -> None:
        async with stack() as s:
            _, _, body = await s.exchange(get("/", host="<script>alert(1)</script>.example"))
            assert b"<script>" not in body and b"&lt;script&gt;" in body

    run(scenario)


def test_hsts_is_added_unless_the_origin_sets_its_own() -> None:
    async def scenario() -> None:
        async with stack(hsts=Hsts(max_age_seconds=600, include_sub_domains=True)) as s:
            _, headers, _ = await s.exchange(get("/"))
            assert headers["strict-transport-security"] == "max-age=600; includeSubDomains"
        async with stack() as s:
            _, headers, _ = await s.exchange(get("/"))
            assert "strict-transport-security" not in headers

    run(scenario)


# --- from an attacker's review --------------------------------------------------------------


def test_an_origin_writing_past_its_response_never_answers_the_next_client() -> None:
    """A broken origin sends a whole extra response after the one asked for: it must go to the
    client who caused it (or nowhere), and the stream must not serve anyone after."""

    async def scenario() -> None:
        async with stack() as s:
            for _ in range(3):
                assert (await s.exchange(get("/overrun")))[2] == b"ok"
                await asyncio.sleep(0.05)
                for user in ("victim", "bob"):
                    assert await whoami(s, user) == f"you are {user}".encode()

    run(scenario)


def test_a_second_upgrade_behind_a_refused_one_keeps_the_client_paused_and_bounded() -> None:
    async def scenario() -> None:
        async with stack() as s:
            reader, writer = await s.connect()
            writer.write(get("/ws", UPGRADE) + get("/ws-slow", UPGRADE))
            assert (await read_response(reader))[0] == 200
            for _ in range(64):  # 4 MiB more while the second upgrade waits for its answer
                writer.write(b"z" * 65536)
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(writer.drain(), 0.05)
            await asyncio.sleep(0.3)
            for client in s.proxy.clients:
                waiting = client.upgrade_wait
                assert waiting is None or len(waiting) <= 64 * 1024, len(waiting)
            writer.close()

    run(scenario)


def test_a_pipelined_head_request_still_ends_at_the_idle_timeout() -> None:
    async def scenario() -> None:
        async with stack(ClientLimits.model_construct(keep_alive_timeout_seconds=0.5)) as s:
            reader, writer = await s.connect()
            writer.write(get("/") + b"HEAD / HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.read(), 5)  # (this origin sends HEAD a body too)
            assert reader.at_eof()  # closed when idle, responses untracked or not

    run(scenario)


def test_a_client_that_stops_reading_is_cut_off_and_frees_its_place() -> None:
    async def scenario() -> None:
        async with stack(ClientLimits.model_construct(keep_alive_timeout_seconds=0.5)) as s:
            _, writer = await s.connect()
            writer.write(get("/big"))  # 16 MiB, and nothing read
            assert await eventually(lambda: s.proxy.caps.total == 0, 10)
            assert s.gateway_stats.limit_hits["send_timeout"] == 1
            writer.close()

    run(scenario)


def test_a_head_fed_one_byte_at_a_time_costs_what_one_fed_at_once_does() -> None:
    """httptools joins a value split over many calls with quadratic copies; the gateway hands
    it a head only once the head is whole."""

    class Transport:
        def __init__(self) -> None:
            self.written = b""

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("192.0.2.1", 1) if name == "peername" else default

        def write(self, data: bytes) -> None:
            self.written += data

        def close(self) -> None: ...
        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    connection = HttpsProxy(EdgeStats("gateway")).protocol()
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    head = b"GET / HTTP/1.1\r\nHost: nowhere.example\r\nX-Long: " + b"a" * 60000 + b"\r\n\r\n"
    began = time.perf_counter()
    for i in range(len(head)):
        connection.data_received(head[i : i + 1])
    assert time.perf_counter() - began < 1.0
    assert transport.written.startswith(b"HTTP/1.1 404 ")
