"""The rules of a client's request head (pure), the connection caps, the HSTS field, and the
trusted-proxy ranges' validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kakuremichi.api.fields import describe_errors
from kakuremichi.api.resources import ClientLimits, GatewaySpec, Hsts
from kakuremichi.edge.connection_caps import ConnectionCaps, address_key
from kakuremichi.edge.https_proxy import with_field
from kakuremichi.edge.request_heads import (
    Target,
    address_field,
    client_address,
    connection_options,
    forwarded_for,
    parse_networks,
    request_target,
    transfer_coding_error,
)
from kakuremichi.edge.stats import EdgeStats

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize(
    ("client", "sent", "expected"),
    [
        (b"198.51.100.4", [b"1.2.3.4"], (b"198.51.100.4", b"198.51.100.4")),  # not a proxy
        (b"10.0.0.5", [], (b"10.0.0.5", b"10.0.0.5")),
        (b"10.0.0.5", [b"203.0.113.9"], (b"203.0.113.9, 10.0.0.5", b"203.0.113.9")),
        # the nearest address outside the trusted ranges is the client, whatever came before
        (b"10.0.0.5", [b"6.6.6.6, 203.0.113.9, 10.1.1.1"],
         (b"6.6.6.6, 203.0.113.9, 10.1.1.1, 10.0.0.5", b"203.0.113.9")),
        (b"10.0.0.5", [b"6.6.6.6", b"203.0.113.9"],
         (b"6.6.6.6, 203.0.113.9, 10.0.0.5", b"203.0.113.9")),
        (b"10.0.0.5", [b"6.6.6.6, garbage"], (b"6.6.6.6, garbage, 10.0.0.5", b"10.0.0.5")),
        (b"2001:db8::7", [b"203.0.113.9"], (b"203.0.113.9, 2001:db8::7", b"203.0.113.9")),
    ],
)  # fmt: skip
def test_forwarded_for_believes_only_trusted_proxies(
    client: bytes, sent: list[bytes], expected: tuple[bytes, bytes]
) -> None:
    assert forwarded_for(client, sent, PROXIES) == expected


def test_address_fields_include_underscore_spellings() -> None:
    for name in (b"x-real-ip", b"x_real_ip", b"forwarded", b"x-forwarded-for", b"x_forwarded_host",
                 b"true-client-ip", b"true_client_ip", b"cf-connecting-ip"):  # fmt: skip
        assert address_field(name), name
    assert not address_field(b"x-request-id")


def test_connection_options_never_name_framing_fields() -> None:
    values = [b"keep-alive, X-Api-Key", b"Content-Length,host , Upgrade, TE"]
    assert connection_options(values) == {b"x-api-key", b"te"}


@pytest.mark.parametrize(
    ("url", "method", "expected"),
    [
        (b"/a?b", b"GET", Target(b"/a?b", b"")),
        (b"*", b"OPTIONS", Target(b"*", b"")),
        (b"*", b"GET", None),
        (b"http://app.example.com", b"GET", Target(b"/", b"app.example.com")),
        (b"HTTPS://App.example.com:443/x?y", b"GET", Target(b"/x?y", b"App.example.com:443")),
        (b"https://app.example.com?q", b"GET", Target(b"/?q", b"app.example.com")),
        (b"http://user@app.example.com/", b"GET", None),
        (b"ftp://app.example.com/", b"GET", None),
        (b"index.html", b"GET", None),
    ],
)
def test_request_targets(url: bytes, method: bytes, expected: Target | None) -> None:
    assert request_target(url, method) == expected


def test_only_chunked_alone_is_a_transfer_coding_on_1_1() -> None:
    assert transfer_coding_error([], "1.1") is None
    assert transfer_coding_error([b"Chunked"], "1.1") is None
    for values in ([b"gzip"], [b"chunked, gzip"], [b"gzip", b"chunked"], [b"chunked", b"chunked"]):
        assert transfer_coding_error(values, "1.1") is not None, values
    assert transfer_coding_error([b"chunked"], "1.0") is not None


def test_client_addresses_and_their_cap_keys() -> None:
    assert client_address(("::ffff:192.0.2.1", 443, 0, 0)) == b"192.0.2.1"
    assert client_address(("2001:db8::1", 443, 0, 0)) == b"2001:db8::1"
    assert client_address(None) == b""
    assert address_key(b"2001:db8:1:2:aaaa::1") == address_key(b"2001:db8:1:2:bbbb::9")
    assert address_key(b"2001:db8:1:3::1") != address_key(b"2001:db8:1:2::1")


def test_connection_caps_count_and_free() -> None:
    stats = EdgeStats("gateway")
    caps = ConnectionCaps(stats, ClientLimits(max_connections_per_address=2, max_connections=3))
    keys = [caps.admit(b"192.0.2.1"), caps.admit(b"192.0.2.1")]
    assert caps.admit(b"192.0.2.1") is None
    third = caps.admit(b"192.0.2.2")
    assert caps.admit(b"192.0.2.3") is None
    assert dict(stats.limit_hits) == {"max_connections_per_address": 1, "max_connections": 1}
    for key in (*keys, third):
        assert key is not None
        caps.leave(key)
    assert caps.total == 0 and not caps.by_address
    # A load balancer in front carries many clients: held to the total only.
    caps.exempt = parse_networks(["192.0.2.0/24"])
    assert all(caps.admit(b"192.0.2.1") is not None for _ in range(3))
    assert caps.admit(b"192.0.2.1") is None  # the total
    assert stats.limit_hits["max_connections"] == 2


def test_hsts_goes_on_final_response_heads_that_lack_it() -> None:
    line = Hsts(max_age_seconds=60).header()
    assert line == b"Strict-Transport-Security: max-age=60\r\n"
    marker = b"\r\nstrict-transport-security:"
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert with_field(plain, line, marker) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + line + b"\r\nok"
    )
    own = b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\n\r\n"
    assert with_field(own, line, marker) == own
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert with_field(interim + plain, line, marker) == interim + with_field(plain, line, marker)
    assert (
        with_field(b"HTTP/1.1 200 OK\r\nX-Half: ", line, marker) == b"HTTP/1.1 200 OK\r\nX-Half: "
    )
    assert b"includeSubDomains" in Hsts(include_sub_domains=True).header()


def test_trusted_proxies_are_cidr_ranges_named_in_the_error() -> None:
    assert GatewaySpec.model_validate(
        {"trustedProxies": ["10.1.2.3/8", "2001:db8::/32"]}
    ).trusted_proxies == ["10.0.0.0/8", "2001:db8::/32"]
    with pytest.raises(ValidationError) as refused:
        GatewaySpec.model_validate({"trustedProxies": ["10.0.0.1"]})
    (line,) = describe_errors(refused.value)
    assert "trustedProxies" in line and "write it with its prefix" in line, line
