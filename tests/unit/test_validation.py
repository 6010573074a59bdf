"""The data-model document's validation rules: every rule accepts what it should and rejects what
it should with a message that says why."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from kakuremichi.api import validation

VALID_NAMES = ["a", "home-server", "gateway-tokyo", "x" * 64, "a1", "0abc", "web-01"]
INVALID_NAMES = [
    ("", "must not be empty"),
    ("x" * 65, "at most 64 characters"),
    ("Home", "lower-case letters"),
    ("home_server", "lower-case letters"),  # '_' is allowed by the document, not by Kubernetes
    ("-home", "starting and ending"),
    ("home-", "starting and ending"),
    ("home.server", "lower-case letters"),
    ("home server", "lower-case letters"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_resource_name_accepts(name: str) -> None:
    assert validation.resource_name(name) == name


@pytest.mark.parametrize(("name", "why"), INVALID_NAMES)
def test_resource_name_rejects_with_reason(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validation.resource_name(name)


VALID_DOMAINS = [
    "app.example.com",
    "example.com",
    "a.b",
    "xn--bcher-kva.example",
    "a-b.c-d.example",
    "1.2.3.example",
    "api.v2.example.co",
    ".".join(["a" * 63] * 3),
    ".".join(["a" * 49] * 5) + ".abc",  # 253 characters
    "1a.com1",
]
INVALID_DOMAINS = [
    ("", "must not be empty"),
    ("localhost", "at least two labels"),
    ("app.example.com.", "must not end with a dot"),
    ("*.example.com", "wildcard"),
    ("App.Example.com", "lower-case"),
    ("1.2.3.4", "IP address"),
    ("::1", "IP address"),
    ("app.example.123", "last label must not be all-numeric"),
    ("app..example.com", "empty label"),
    ("-app.example.com", "must not start or end with '-'"),
    ("app-.example.com", "must not start or end with '-'"),
    ("app_1.example.com", "may hold only"),
    ("a" * 64 + ".com", "longer than 63"),
    (".".join(["a" * 49] * 5) + ".abcd", "at most 253 characters"),
    ("app.example.com:8080", "may hold only"),
]


@pytest.mark.parametrize("domain", VALID_DOMAINS)
def test_domain_accepts(domain: str) -> None:
    assert validation.domain_name(domain) == domain


@pytest.mark.parametrize(("domain", "why"), INVALID_DOMAINS)
def test_domain_rejects_with_reason(domain: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validation.domain_name(domain)


VALID_TARGETS = [
    "localhost:8080",
    "192.168.1.10:3000",
    "127.0.0.1:1",
    "web:65535",
    "web.default.svc.cluster.local:80",
    "[::1]:8080",
    "[fd00::10]:443",
    "My-Host:80",
]
INVALID_TARGETS = [
    ("localhost", "must be host:port"),
    (":8080", "missing the host"),
    ("localhost:", "missing the port"),
    ("localhost:0", "between 1 and 65535"),
    ("localhost:65536", "between 1 and 65535"),
    ("localhost:080", "without leading zeros"),
    ("localhost:http", "must be a number"),
    ("::1:8080", "in brackets"),
    ("[::1:8080", "closing"),
    ("[zz::1]:80", "not a valid IPv6"),
    ("999.1.1.1:80", "not a valid IPv4"),
    ("10:80", "not a valid IPv4"),
    ("web_app:80", "may hold only"),
    ("-web:80", "must not start or end"),
    ("http://localhost:8080", "without a scheme"),
]


@pytest.mark.parametrize("target", VALID_TARGETS)
def test_target_accepts(target: str) -> None:
    assert validation.target_address(target) == target


@pytest.mark.parametrize(("target", "why"), INVALID_TARGETS)
def test_target_rejects_with_reason(target: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validation.target_address(target)


def test_host_port_parses_brackets_away() -> None:
    assert validation.HostPort.parse("[::1]:8080") == validation.HostPort("::1", 8080)
    assert validation.HostPort.parse("localhost:80") == validation.HostPort("localhost", 80)


VALID_PUBLIC_IPS = [
    "1.2.3.4",
    "120.0.0.1",
    "100.64.0.1",
    "99.1.1.1",
    "203.0.113.7",
    "126.255.255.255",
    "128.0.0.1",
    "223.255.255.254",
]
VALID_PUBLIC_IPS += ["192.168.1.10", "10.0.0.1"]  # private addresses are fine for LAN gateways
INVALID_PUBLIC_IPS = [
    ("0.1.2.3", "0.0.0.0/8"),
    ("127.0.0.1", "loopback"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.255", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("1.2.3", "not a valid IPv4"),
    ("01.2.3.4", "not a valid IPv4"),
    ("::1", "not a valid IPv4"),
    ("example.com", "not a valid IPv4"),
]


@pytest.mark.parametrize("address", VALID_PUBLIC_IPS)
def test_public_ip_accepts(address: str) -> None:
    assert validation.public_ipv4(address) == address


@pytest.mark.parametrize(("address", "why"), INVALID_PUBLIC_IPS)
def test_public_ip_rejects_with_reason(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validation.public_ipv4(address)


@pytest.mark.parametrize("value", ["tokyo", "eu-west-1", "a"])
def test_region_accepts(value: str) -> None:
    assert validation.region(value) == value


@pytest.mark.parametrize("value", ["", "Tokyo", "x" * 33, "tokyo-"])
def test_region_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="not a valid region"):
        validation.region(value)


@pytest.mark.parametrize(
    ("text", "amount"),
    [("50m", "0.05"), ("2", "2"), ("1.5", "1.5"), ("64Mi", str(64 * 2**20)), ("1G", "1e9"),
     ("0.5Gi", str(2**29))],
)  # fmt: skip
def test_quantity_amounts(text: str, amount: str) -> None:
    assert validation.quantity_amount(text) == Decimal(amount)


@pytest.mark.parametrize("text", ["", "two", "-1", "+1", "1e3", "1.", ".5", "1 Gi", "1gi", "5mi"])
def test_quantity_rejects_what_nobody_means(text: str) -> None:
    with pytest.raises(ValueError, match="is not a resource quantity"):
        validation.quantity(text)
    assert not re.search(validation.QUANTITY_PATTERN, text)
