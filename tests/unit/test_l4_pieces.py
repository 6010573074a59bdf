"""The pure pieces of TCP, UDP and TLS-passthrough Tunnels, each against what a hostile peer
would send: PROXY headers, ClientHellos, stream names, UDP frames."""

from __future__ import annotations

import ssl
import time
from typing import Any

import pytest
from pydantic import ValidationError

from kakuremichi.api.resources import GatewaySpec, PortRange
from kakuremichi.edge import client_hello, proxy_header, stream_names, udp_frames
from kakuremichi.edge.client_hello import HelloReader, peek_server_name
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.proxy_header import ProxyHeaderError
from kakuremichi.edge.splice import CLOSE_TIMEOUT, ClientLink, Splices
from kakuremichi.edge.stats import EdgeStats


def client_hello_of(name: str | None) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- PROXY headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["V1", "V2"])
@pytest.mark.parametrize(
    ("client", "gateway"),
    [(("198.51.100.7", 40000), ("203.0.113.1", 2222)), (("2001:db8::7", 1), ("2001:db8::1", 443))],
)
def test_a_header_written_reads_back(
    version: str, client: tuple[str, int], gateway: tuple[str, int]
) -> None:
    header = proxy_header.encode(version, client, gateway)  # type: ignore[arg-type]
    parsed = proxy_header.parse(header + b"payload")
    assert parsed is not None and parsed.length == len(header)
    assert (parsed.source, parsed.destination) == (client, gateway)


def test_the_specifications_own_examples() -> None:
    v1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    assert proxy_header.parse(v1) == proxy_header.ProxyHeader(
        47, ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )
    assert proxy_header.parse(b"PROXY UNKNOWN\r\n") == proxy_header.ProxyHeader(15, None)
    local = proxy_header.encode("V2", None, None)
    assert proxy_header.parse(local) == proxy_header.ProxyHeader(16, None)


def test_udp_has_only_the_v2_form() -> None:
    with pytest.raises(ValueError, match="no form for UDP"):
        proxy_header.encode("V1", ("198.51.100.7", 1), ("203.0.113.1", 53), datagram=True)
    header = proxy_header.encode("V2", ("198.51.100.7", 1), ("203.0.113.1", 53), datagram=True)
    assert header[13] == 0x12  # UDP over IPv4


@pytest.mark.parametrize(
    "forged",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # a trailing space
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",  # not an address as written
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # IPv6 said to be IPv4
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a scope: no client's address
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # a port with a leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY " + b"A" * 120,  # no CRLF within 107 bytes
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
        proxy_header.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + b"\0" * 12,  # version 3
        proxy_header.V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + b"\0" * 4,  # short addresses
        proxy_header.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # 64 KiB announced
        b"GET / HTTP/1.1\r\n",  # no header at all
    ],
)
def test_a_malformed_header_is_refused_not_guessed_at(forged: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxy_header.parse(forged)


def test_a_header_arriving_in_pieces_waits_for_the_rest() -> None:
    whole = proxy_header.encode("V2", ("198.51.100.7", 40000), ("203.0.113.1", 2222))
    for cut in range(1, len(whole)):
        assert proxy_header.parse(whole[:cut]) is None
    assert proxy_header.parse(b"PROXY TCP4 1.2") is None


# --- ClientHello ----------------------------------------------------------------------------------


def test_the_name_of_a_real_client_hello() -> None:
    assert peek_server_name(client_hello_of("Vault.Example.com")) == client_hello.Peeked(
        True, "vault.example.com"
    )
    assert peek_server_name(client_hello_of(None)) == client_hello.NO_NAME
    assert peek_server_name(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == client_hello.NO_NAME


def as_records(hello: bytes, size: int) -> bytes:
    """The ClientHello's handshake bytes cut into records of ``size`` bytes."""
    body = hello[5:]
    out = b""
    for at in range(0, len(body), size):
        piece = body[at : at + size]
        out += hello[:3] + len(piece).to_bytes(2, "big") + piece
    return out


def test_a_client_hello_fed_a_byte_at_a_time_is_read_once_and_found() -> None:
    hello = client_hello_of("vault.example.com")
    reader = HelloReader()
    started = time.process_time()
    for at in range(len(hello) - 1):
        assert reader.feed(hello[at : at + 1]) == client_hello.MORE
    assert reader.feed(hello[-1:]).name == "vault.example.com"
    assert time.process_time() - started < 0.05  # each byte looked at once, not re-parsed
    assert bytes(reader.raw) == hello  # what goes on is what came


def test_a_client_hello_in_many_tiny_records_or_announcing_too_much_is_no_name() -> None:
    hello = client_hello_of("vault.example.com")
    assert peek_server_name(as_records(hello, 200)).name == "vault.example.com"  # a few: fine
    assert peek_server_name(as_records(hello, 1)) == client_hello.NO_NAME  # over 8 records
    announced = bytearray(hello)
    announced[6:9] = (64 * 1024).to_bytes(3, "big")  # a 64 KiB ClientHello, to come
    assert peek_server_name(bytes(announced)) == client_hello.NO_NAME


# --- stream names and UDP frames ----------------------------------------------------------------


def test_a_stream_name_carries_the_addresses_or_is_refused() -> None:
    name = stream_names.StreamName("db.example.com", ("2001:db8::7", 5), ("203.0.113.1", 5432))
    assert stream_names.decode(name.encode()) == name
    assert stream_names.decode("db.example.com") == stream_names.StreamName("db.example.com")
    for forged in ("a;1.2.3.4;1", "a;x;1;1.2.3.4;2", "a;1.2.3.4;99999;1.2.3.4;2",
                   "a;fe80::1%eth0;1;1.2.3.4;2"):  # fmt: skip
        with pytest.raises(stream_names.StreamNameError):
            stream_names.decode(forged)


def test_a_frame_reads_back_and_a_malformed_one_is_refused() -> None:
    frame = udp_frames.encode(5353, ("2001:db8::7", 40000), b"query")
    port, client, payload = udp_frames.decode(frame)
    assert (port, client, bytes(payload)) == (5353, ("2001:db8::7", 40000), b"query")
    assert udp_frames.max_datagram("198.51.100.7") == 1382
    assert udp_frames.max_datagram("2001:db8::7") == 1370
    for forged in (b"", b"\x02" + frame[1:], frame[:3] + b"\x05" + frame[4:], frame[:10]):
        with pytest.raises(udp_frames.FrameError):
            udp_frames.decode(forged)


# --- the Gateway's port ranges --------------------------------------------------------------------


def test_a_pool_opens_no_port_to_tunnels_unless_its_admin_says_so() -> None:
    assert GatewaySpec().tunnel_ports == []
    spec = GatewaySpec.model_validate(
        {"tunnelPorts": [{"first": 53, "last": 53}, {"first": 20000, "last": 29999}]}
    )
    assert [str(r) for r in spec.tunnel_ports] == ["53", "20000-29999"]
    with pytest.raises(ValidationError, match="last must not be below first"):
        PortRange(first=2000, last=1000)


# --- a spliced connection being closed ----------------------------------------------------------


class StuckTransport:
    """A client that will not take what is left (a zero window): close() never completes."""

    def __init__(self) -> None:
        self.aborted = False
        self.closing = False
        self.left = 100_000

    def get_write_buffer_size(self) -> int:
        return self.left

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_a_connection_whose_client_stops_reading_is_cut_off_after_the_close_timeout() -> None:
    stats = EdgeStats("gateway")
    splices = Splices(stats, dialer=None)  # type: ignore[arg-type]
    route = GatewayRoute(domain="db.example.com", agent_ip="10.1.0.100", protocol="TCP", port=1)
    link = ClientLink(splices, route, caps=None, admitted=b"x")  # type: ignore[arg-type]
    transport = StuckTransport()
    link.transport = transport  # type: ignore[assignment]
    splices.links.add(link)
    now = time.monotonic()
    splices.idle_timeout = 10
    splices.sweep(now + 11)  # idle: closed, and counted once
    assert transport.closing and not transport.aborted
    splices.sweep(now + 12)
    assert stats.limit_hits["tcp_idle_timeout"] == 1
    transport.left = 90_000  # a slow reader, still taking some: its time starts again
    splices.sweep(now + 16)
    splices.sweep(now + 16 + CLOSE_TIMEOUT - 1)
    assert not transport.aborted
    splices.sweep(now + 16 + CLOSE_TIMEOUT + 1)  # nothing taken for longer than the timeout
    assert transport.aborted
