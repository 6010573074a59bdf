"""Per-request routing (hosts served from Ingress and HTTPRoute rules): the pure matcher, then the
gateway's proxy and an agent relaying to a backend's endpoints, wired on loopback: paths, headers,
weights, header edits, endpoints coming and going, and the ways a client tries to get a path past
the rules."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import pytest
from aiohttp import web

from kakuremichi.api import protocol
from kakuremichi.api.protocol import (
    AgentBackend,
    AgentConfig,
    GatewayTunnel,
    PathMatch,
    RequestMatch,
    RequestRule,
    WeightedBackend,
)
from kakuremichi.api.request_paths import PathRefused, normalize_path
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import FrontEndConfig, GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy
from kakuremichi.edge.request_routing import Request, RequestRouter
from kakuremichi.edge.stats import EdgeStats
from tests.infra.front_end import serve_https
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA

DOMAIN = "shop.example.com"
API, WEB, CANARY = "shop/api:8080", "shop/web:80", "shop/canary:80"


def rules(*specs: dict[str, Any]) -> tuple[RequestRule, ...]:
    return tuple(RequestRule.model_validate(spec) for spec in specs)


def prefix(value: str, stream: str, **more: Any) -> dict[str, Any]:
    return {"matches": [{"path": {"type": "PathPrefix", "value": value}}],
            "backends": [{"stream": stream}], **more}  # fmt: skip


def asked(path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Request:
    raw, _, query = path.partition("?")
    lines = [f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items()]
    names = [k.lower().encode() for k in (headers or {})]
    return Request(method.encode(), normalize_path(raw.encode()), query.encode(), lines, names)


# --- the matcher ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a//b", "/a/b"),
        ("/a/./b/", "/a/b/"),
        ("/a/../b", "/b"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/%61dmin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2E", "/"),
        ("/a%3fb", "/a%3Fb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
    ],
)
def test_a_path_is_matched_as_an_origin_would_read_it(raw: str, normal: str) -> None:
    assert normalize_path(raw.encode()) == normal.encode()


@pytest.mark.parametrize(
    "raw", ["/a%2fb", "/a%2Fb", "/a%5cb", "/a\\b", "/a%zz", "/a%4", "/a\x7fb", "/a b"]
)
def test_paths_origins_disagree_about_are_refused(raw: str) -> None:
    with pytest.raises(PathRefused):
        normalize_path(raw.encode())


def test_a_prefix_matches_whole_segments_and_an_exact_path_only_itself() -> None:
    router = RequestRouter(rules(
        {"matches": [{"path": {"type": "Exact", "value": "/login"}}],
         "backends": [{"stream": WEB}]},
        prefix("/api/", API),
    ))  # fmt: skip
    paths = ("/api", "/api/", "/api/v1", "/apiv1", "/login", "/login/", "/")
    chosen = {p: getattr(router.choose(asked(p)), "stream", None) for p in paths}
    assert chosen == {"/api": API, "/api/": API, "/api/v1": API, "/apiv1": None,
                      "/login": WEB, "/login/": None, "/": None}  # fmt: skip


def test_headers_method_and_query_must_all_fit_and_the_first_fitting_rule_wins() -> None:
    router = RequestRouter(rules(
        {"matches": [{"path": {"value": "/"}, "method": "POST",
                      "headers": [{"name": "X-Canary", "value": "yes"},
                                  {"name": "x-canary", "value": "ignored: the first counts"}],
                      "query": [{"name": "v", "value": "2 beta"}]}],
         "backends": [{"stream": CANARY}]},
        {"backends": [{"stream": WEB}]},  # no match: every request
    ))  # fmt: skip
    canary = {"x-CANARY": "yes"}
    assert router.choose(asked("/x?v=2%20beta", "POST", canary)).stream == CANARY  # type: ignore[union-attr]
    for misfit in (asked("/x?v=2%20beta", "GET", canary), asked("/x?v=2", "POST", canary),
                   asked("/x?v=2%20beta", "POST", {"X-Canary": "Yes"})):  # fmt: skip
        assert router.choose(misfit).stream == WEB  # type: ignore[union-attr]


def test_weights_share_requests_and_a_rule_without_weight_has_no_backend() -> None:
    draws = iter(range(4))
    router = RequestRouter(
        rules({"backends": [{"stream": WEB, "weight": 3}, {"stream": API, "weight": 0},
                            {"stream": CANARY, "weight": 1}]}),
        draw=lambda total: next(draws) % total,
    )  # fmt: skip
    assert [router.choose(asked("/")).stream for _ in range(4)] == [WEB, WEB, WEB, CANARY]  # type: ignore[union-attr]
    assert router.streams == {WEB, CANARY}
    empty = RequestRouter(rules({"backends": [{"stream": WEB, "weight": 0}]}))
    choice = empty.choose(asked("/"))
    assert choice is not None and choice.stream is None
    # A backend that does not resolve keeps its share, answered 500 (no stream).
    draws = iter(range(4))
    half = RequestRouter(
        rules({"backends": [{"stream": WEB, "weight": 1}, {"stream": None, "weight": 1}]}),
        draw=lambda total: next(draws) % total,
    )
    assert [half.choose(asked("/")).stream for _ in range(4)] == [WEB, None, WEB, None]  # type: ignore[union-attr]
    assert half.streams == {WEB}


def test_header_edits_never_touch_framing_host_or_client_address_fields() -> None:
    router = RequestRouter(rules({"backends": [{"stream": WEB}], "requestHeaders": {
        "set": [{"name": "X-Team", "value": "shop"}, {"name": "Host", "value": "evil"},
                {"name": "X-Forwarded-For", "value": "1.2.3.4"}],
        "add": [{"name": "X-Trace", "value": "on"}, {"name": "Transfer-Encoding", "value": "x"}],
        "remove": ["Cookie", "Content-Length", "X-Real-IP"],
    }}))  # fmt: skip
    choice = router.choose(asked("/"))
    assert choice is not None and choice.edits is not None
    lines, names = choice.edits.apply(
        [b"Host: shop.example.com\r\n", b"X-Team: other\r\n", b"Cookie: a\r\n"],
        [b"host", b"x-team", b"cookie"],
    )
    assert lines == [b"Host: shop.example.com\r\n", b"X-Team: shop\r\n", b"X-Trace: on\r\n"]
    assert names == [b"host", b"x-team", b"x-trace"]


def test_a_header_value_cannot_end_a_line() -> None:
    smuggled = {"name": "X-A", "value": "a\r\nX-Forwarded-For: 1"}
    with pytest.raises(ValueError, match="pattern"):
        rules({"backends": [{"stream": WEB}], "requestHeaders": {"set": [smuggled]}})
    with pytest.raises(ValueError, match="pattern"):
        rules({"backends": [{"stream": "../etc:80"}]})


# --- through a gateway and an agent --------------------------------------------------------------


def named_origin(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(0.3)  # (still answering when the next request comes)
        return web.json_response({"origin": name, "path": request.raw_path,
                                  "headers": dict(request.headers)})  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class Stack:
    https_port: int
    relay: AgentRelay
    proxy: HttpsProxy
    origins: dict[str, int]
    """Origin name → its port."""
    client_tls: ssl.SSLContext

    def route(self, *specs: dict[str, Any]) -> None:
        self.proxy.set_routes(
            {DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1", rules=rules(*specs))}
        )

    def backends(self, endpoints: dict[str, list[str]]) -> None:
        """Backend stream name → the names of its origins (as an EndpointSlice lists them)."""
        self.relay.set_targets({
            name: AgentTarget.backend(
                AgentBackend(name=name, endpoints=[self.at(o) for o in origins])
            )
            for name, origins in endpoints.items()
        })  # fmt: skip

    def at(self, origin: str) -> str:
        return f"127.0.0.1:{self.origins.get(origin) or free_port()}"  # (unknown: nobody there)

    async def get(
        self, path: str, headers: str = "", reader_writer: Any = None
    ) -> tuple[int, dict[str, Any]]:
        reader, writer = reader_writer or await asyncio.open_connection(
            "127.0.0.1", self.https_port, ssl=self.client_tls, server_hostname=DOMAIN
        )
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n{headers}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split()[1])
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        if reader_writer is None:
            writer.close()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"text": body.decode()}


@asynccontextmanager
async def stack(*names: str) -> AsyncIterator[Stack]:
    ca = TestCA()
    issued = ca.issue(DOMAIN)
    runners, origins = [], {}
    for name in names:
        runner = web.AppRunner(named_origin(name), access_log=None)
        await runner.setup()
        origins[name] = free_port()
        await web.TCPSite(runner, "127.0.0.1", origins[name]).start()
        runners.append(runner)
    relay = AgentRelay(EdgeStats("agent"))
    relay.set_gateways({"127.0.0.1"})
    relay_port = free_port()
    relay_server = await asyncio.get_running_loop().create_server(
        relay.protocol, "127.0.0.1", relay_port
    )
    proxy = HttpsProxy(EdgeStats("gateway"), relay_port=relay_port)
    server, https_port = await serve_https(proxy, DOMAIN, issued)
    try:
        yield Stack(https_port, relay, proxy, origins, ssl.create_default_context(cadata=ca.pem))
    finally:
        server.close()
        proxy.close_all()
        relay.close_all()
        relay_server.close()
        for runner in runners:
            await runner.cleanup()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_paths_go_to_their_backends_with_the_path_that_chose_them() -> None:
    async def scenario() -> None:
        async with stack("api", "web") as s:
            s.backends({API: ["api"], WEB: ["web"]})
            s.route(prefix("/api", API), prefix("/", WEB))
            assert (await s.get("/api/items?x=1"))[1] | {"headers": None} == {
                "origin": "api", "path": "/api/items?x=1", "headers": None}  # fmt: skip
            assert (await s.get("/apix"))[1]["origin"] == "web"
            # Dot segments and encoded letters are resolved before matching, and forwarded so:
            # the API backend never sees a path that the rules sent elsewhere, and vice versa.
            status, body = await s.get("/static/%2e%2e/%61pi/secret")
            assert (status, body["origin"], body["path"]) == (200, "api", "/api/secret")

    run(scenario)


def test_a_request_no_rule_fits_is_not_found_and_a_rule_without_backend_is_500() -> None:
    async def scenario() -> None:
        async with stack("api") as s:
            s.backends({API: ["api"]})
            s.route(prefix("/api", API),
                    {"matches": [{"path": {"value": "/old"}}],
                     "backends": [{"stream": API, "weight": 0}]})  # fmt: skip
            assert (await s.get("/"))[0] == 404
            assert (await s.get("/old/page"))[0] == 500
            assert (await s.get("/api"))[0] == 200

    run(scenario)


def test_an_encoded_slash_cannot_carry_a_path_past_the_rules() -> None:
    async def scenario() -> None:
        async with stack("api", "web") as s:
            s.backends({API: ["api"], WEB: ["web"]})
            s.route(prefix("/public", WEB))  # only /public is published
            for path in ("/public/..%2Fadmin", "/public/..%5Cadmin", "/public/..\\admin"):
                status, body = await s.get(path)
                assert status == 400 and "slash" in body["text"], path
            assert (await s.get("/public/../admin"))[0] == 404  # resolved to /admin: no rule

    run(scenario)


def test_weights_share_requests_between_backends() -> None:
    async def scenario() -> None:
        async with stack("web", "canary") as s:
            s.backends({WEB: ["web"], CANARY: ["canary"]})
            s.route({"backends": [{"stream": WEB, "weight": 3}, {"stream": CANARY, "weight": 1}]})
            connection = await asyncio.open_connection(
                "127.0.0.1", s.https_port, ssl=s.client_tls, server_hostname=DOMAIN
            )
            seen = Counter([(await s.get("/", reader_writer=connection))[1]["origin"]
                            for _ in range(400)])  # fmt: skip
            # per request, even on one kept-alive connection (3:1, with room for chance)
            assert 240 <= seen["web"] <= 360 and seen["web"] + seen["canary"] == 400

    run(scenario)


def test_header_edits_reach_the_backend_and_the_client_address_stays_the_gateways() -> None:
    async def scenario() -> None:
        async with stack("web") as s:
            s.backends({WEB: ["web"]})
            s.route(prefix("/", WEB, requestHeaders={
                "set": [{"name": "X-Team", "value": "shop"}],
                "add": [{"name": "X-Real-IP", "value": "6.6.6.6"}],
                "remove": ["X-Debug"]}))  # fmt: skip
            _, body = await s.get("/", "X-Team: other\r\nX-Debug: 1\r\nX-Real-IP: 7.7.7.7\r\n")
            headers = body["headers"]
            assert headers["X-Team"] == "shop" and "X-Debug" not in headers
            assert headers["X-Real-IP"] == "127.0.0.1" and headers["X-Forwarded-For"] == "127.0.0.1"

    run(scenario)


def test_connections_are_spread_and_an_endpoint_that_leaves_gets_no_more_requests() -> None:
    async def scenario() -> None:
        async with stack("a", "b") as s:
            s.route(prefix("/", WEB))
            s.backends({WEB: ["a", "b"]})
            connection = await asyncio.open_connection(
                "127.0.0.1", s.https_port, ssl=s.client_tls, server_hostname=DOMAIN
            )
            # Two clients at once hold two streams: each gets another endpoint.
            first, second = await asyncio.gather(s.get("/slow"), s.get("/slow"))
            assert {first[1]["origin"], second[1]["origin"]} == {"a", "b"}
            assert (await s.get("/", reader_writer=connection))[1]["origin"] in {"a", "b"}
            s.backends({WEB: ["b"]})  # a's pod went away
            s.relay.sweep(time.monotonic() + 3)  # quiet kept-alive relays to it close
            await asyncio.sleep(0.2)
            seen = {(await s.get("/", reader_writer=connection))[1]["origin"] for _ in range(20)}
            assert seen == {"b"}
            # An endpoint that refuses (a pod just gone, its slice not updated yet) is skipped.
            s.backends({WEB: ["gone", "b"]})
            assert [(await s.get("/"))[1]["origin"] for _ in range(6)] == ["b"] * 6
            s.backends({WEB: []})
            s.relay.sweep(time.monotonic() + 3)
            await asyncio.sleep(0.2)
            status, body = await s.get("/")
            assert status == 503 and "No endpoint" in body["text"]

    run(scenario)


def test_a_pipelined_request_for_another_backend_waits_for_a_new_connection() -> None:
    async def scenario() -> None:
        async with stack("api", "web") as s:
            s.backends({API: ["api"], WEB: ["web"]})
            s.route(prefix("/api", API), prefix("/", WEB))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", s.https_port, ssl=s.client_tls, server_hostname=DOMAIN
            )
            writer.write(f"GET /api/1 HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n"
                         f"GET /web HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())  # fmt: skip
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            assert json.loads(await reader.readexactly(length))["origin"] == "api"
            # The second is not answered out of order, nor by the wrong backend: the connection
            # closes and a client sends it again (RFC 9112 9.3.2).
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert (await s.get("/web"))[1]["origin"] == "web"

    run(scenario)


def test_a_domain_handed_from_a_tunnel_to_routes_sends_nothing_more_to_the_tunnel() -> None:
    async def scenario() -> None:
        async with stack("tunnel", "web") as s:
            s.relay.set_targets({
                DOMAIN: AgentTarget(s.at("tunnel")),
                WEB: AgentTarget.backend(AgentBackend(name=WEB, endpoints=[s.at("web")])),
            })  # fmt: skip
            s.proxy.set_routes({DOMAIN: GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1")})
            connection = await asyncio.open_connection(
                "127.0.0.1", s.https_port, ssl=s.client_tls, server_hostname=DOMAIN
            )
            assert (await s.get("/", reader_writer=connection))[1]["origin"] == "tunnel"
            s.route(prefix("/", WEB))  # the pooled stream to the Tunnel's target is not reused
            assert (await s.get("/", reader_writer=connection))[1]["origin"] == "web"
            assert (await s.get("/"))[1]["origin"] == "web"

    run(scenario)


def test_configs_without_routes_are_what_earlier_edges_read() -> None:
    agent = AgentConfig.model_validate(
        {"version": 1, "agent": {"id": str(uuid4()), "virtualIp": "10.1.0.100",
                                 "subnet": "10.1.0.0/24"}}
    )  # fmt: skip
    assert "backends" not in protocol.encode(protocol.AgentConfigMessage(data=agent))
    tunnel = GatewayTunnel(domain=DOMAIN, target="localhost:80")
    assert "rules" not in tunnel.model_dump_json(by_alias=True, exclude_none=True)


def test_a_passed_through_tunnel_that_names_a_backend_goes_to_its_endpoints() -> None:
    """A TLSRoute's host at the cluster agent: the backend's endpoints, never the target; none
    while the backend is not in the config (refused, never the target either)."""
    tunnel = protocol.AgentTunnel(domain=DOMAIN, target="localhost:443", protocol="TLS",
                                  backend="shop/vault:443")  # fmt: skip
    backends = {"shop/vault:443": AgentTarget.backend(
        AgentBackend(name="shop/vault:443", endpoints=["10.244.1.5:8443"]))}  # fmt: skip
    target = AgentTarget.of(tunnel, backends)
    assert (target.protocol, target.endpoints) == ("TLS", ("10.244.1.5:8443",))
    relay = AgentRelay(EdgeStats("agent"))
    assert relay.candidates(DOMAIN, target) == ["10.244.1.5:8443"]
    assert relay.candidates(DOMAIN, AgentTarget.of(tunnel, {})) == []
    plain = protocol.AgentTunnel(domain=DOMAIN, target="localhost:443", protocol="TLS")
    assert "backend" not in plain.model_dump_json(by_alias=True, exclude_none=True)


@pytest.mark.parametrize("raw", ["/admin#x", "/public/..;/admin", "/public/.;x/a", "*", "a/b"])
def test_fragments_dot_parameters_and_non_paths_are_refused_where_rules_route(raw: str) -> None:
    with pytest.raises(PathRefused):
        normalize_path(raw.encode())


def test_a_rule_path_that_could_never_fit_breaks_nothing_else() -> None:
    hopeless = PathMatch.model_construct(type="PathPrefix", value="/x%5C")  # past validation
    rule = RequestRule.model_construct(
        matches=[RequestMatch.model_construct(path=hopeless, method=None, headers=None,
                                              query=None)],
        backends=[WeightedBackend(stream=API)], request_headers=None,
    )  # fmt: skip
    router = RequestRouter((rule, *rules(prefix("/", WEB))))
    assert router.choose(asked("/x")).stream == WEB  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="pattern"):
        PathMatch(value="/x%5C")  # (and control cannot send it)


def test_no_rule_set_makes_a_request_expensive() -> None:
    many = {"matches": [{"path": {"value": f"/p{m}"},
                         "headers": [{"name": f"X-H{h}", "value": "v"} for h in range(16)]}
                        for m in range(64)],
            "backends": [{"stream": WEB}]}  # fmt: skip
    rule = RequestRule.model_validate(many)
    headers = {f"X-H{h}": "v" for h in range(99)}
    request = asked("/nothing", headers=headers)
    started = time.process_time()
    router = RequestRouter([rule] * 1000)
    assert router.left_out == 1000 - 2048 // (64 * 17)  # beyond the budget of conditions
    for _ in range(10):
        assert router.choose(request) is None
    spent = time.process_time() - started
    assert spent < 0.5, spent  # (one request took 5 s before the budget)


def test_a_client_cannot_drop_a_header_a_rule_sets() -> None:
    async def scenario() -> None:
        async with stack("web") as s:
            s.backends({WEB: ["web"]})
            s.route(prefix("/", WEB, requestHeaders={"set": [{"name": "X-Team", "value": "a"}]}))
            _, body = await s.get("/", "Connection: x-team, keep-alive\r\n")
            assert body["headers"]["X-Team"] == "a"

    run(scenario)


def test_an_endpoint_that_left_gets_no_traffic_even_on_a_busy_stream() -> None:
    async def scenario() -> None:
        async with stack("a", "b") as s:
            s.route(prefix("/", WEB))
            s.backends({WEB: ["a"]})
            connection = await asyncio.open_connection(
                "127.0.0.1", s.https_port, ssl=s.client_tls, server_hostname=DOMAIN
            )
            assert (await s.get("/", reader_writer=connection))[1]["origin"] == "a"
            s.backends({WEB: ["b"]})
            s.relay.sweep(time.monotonic())  # busy just now: not quiet yet
            assert (await s.get("/", reader_writer=connection))[1]["origin"] == "a"
            s.relay.sweep(time.monotonic() + 11)  # retired long enough: closed, busy or not
            await asyncio.sleep(0.2)
            assert (await s.get("/", reader_writer=connection))[1]["origin"] == "b"

    run(scenario)


def test_an_endpoint_that_leaves_while_being_connected_to_is_retired_at_once() -> None:
    async def scenario() -> None:
        async with stack("a", "b") as s:
            s.route(prefix("/", WEB))
            s.backends({WEB: ["a"]})
            resolve = s.relay.resolver.resolve

            async def slow(host: str) -> str:
                s.backends({WEB: ["b"]})  # the slice changes mid-connect
                return await resolve(host)

            s.relay.resolver.resolve = slow  # type: ignore[method-assign]
            assert (await s.get("/"))[1]["origin"] == "a"  # this stream is served...
            s.relay.resolver.resolve = resolve  # type: ignore[method-assign]
            assert all(r.retired for r in s.relay.relays if r.endpoint.endswith(
                str(s.origins["a"])))  # fmt: skip
            s.relay.sweep(time.monotonic() + 2)  # ...and closed once quiet
            await asyncio.sleep(0.2)
            assert {(await s.get("/"))[1]["origin"] for _ in range(4)} == {"b"}

    run(scenario)


def test_http2_is_offered_where_calls_are_routed_and_not_where_http_requests_are() -> None:
    """An Ingress's or HTTPRoute's host (rules, HTTP/1.1) is not offered HTTP/2; a GRPCRoute's
    host with rules (h2c) is: its calls are routed one by one."""
    routed = GatewayRoute(domain=DOMAIN, agent_ip="127.0.0.1", rules=rules(prefix("/", WEB)))
    calls = GatewayRoute(
        domain="grpc.example.com", agent_ip="127.0.0.1", h2c=True, rules=rules(prefix("/", WEB))
    )
    assert FrontEndConfig(routes=[routed, calls]).h2c_domains() == {"grpc.example.com"}


def test_normalizing_is_idempotent_and_leaves_no_dot_or_empty_segment() -> None:
    pieces = ["a", "bc", ".", "..", "", "%41", "%2e", "%2E%2e", ".well-known", "x;y"]
    for size in range(1, 5):
        for parts in itertools.product(pieces, repeat=size):
            raw = ("/" + "/".join(parts)).encode()
            normal = normalize_path(raw)
            assert normalize_path(normal) == normal, raw
            segments = normal.split(b"/")[1:]
            assert all(s not in (b".", b"..") for s in segments), raw
            assert b"//" not in normal and normal.startswith(b"/"), raw
