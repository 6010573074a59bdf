"""The edges' small pure pieces: Host parsing, the relay preamble, error pages, settings, backoff,
and SNI choice (an in-memory TLS handshake, no sockets)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.edge.control_client import MAX_BACKOFF_SECONDS, backoff_delay
from kakuremichi.edge.https_proxy import host_name
from kakuremichi.edge.pages import error_response
from kakuremichi.edge.settings import EdgeSettings, MissingApiKey, read_api_key
from kakuremichi.edge.sni import CertificateError, SniContexts
from tests.infra.tlsgen import TestCA


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"App.Example.com", "app.example.com"),
        (b"app.example.com:443", "app.example.com"),
        (b"app.example.com.", "app.example.com"),
        (b"", ""),
        (b"app.example.com:x", "app.example.com:x"),
    ],
)
def test_host_header_names(header: bytes, name: str) -> None:
    assert host_name(header) == name


def test_error_pages_are_complete_responses_that_close() -> None:
    response = error_response(502, "The service is not answering.")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"The service is not answering." in body


def test_api_key_comes_from_flag_then_file_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAKUREMICHI_API_KEY", "agt_env")
    key_file = tmp_path / "apiKey"
    key_file.write_text("agt_file\n")
    assert read_api_key("agt_flag", key_file) == "agt_flag"
    assert read_api_key(None, key_file) == "agt_file"
    assert read_api_key(None, None) == "agt_env"
    monkeypatch.delenv("KAKUREMICHI_API_KEY")
    with pytest.raises(MissingApiKey, match="no API key"):
        read_api_key(None, None)
    with pytest.raises(MissingApiKey, match="No such file"):
        read_api_key(None, tmp_path / "missing")


def test_control_url_must_be_http_or_https() -> None:
    settings = EdgeSettings(control_url="https://control.example.com/", api_key="agt_x")
    assert settings.websocket_url == "https://control.example.com/ws"
    with pytest.raises(ValidationError, match="control_url"):
        EdgeSettings(control_url="control.example.com", api_key="agt_x")


def test_backoff_grows_to_a_ceiling_with_jitter() -> None:
    first = [backoff_delay(0) for _ in range(50)]
    assert all(0.25 <= d <= 0.5 for d in first) and len(set(first)) > 1
    assert all(
        MAX_BACKOFF_SECONDS / 2 <= backoff_delay(20) <= MAX_BACKOFF_SECONDS for _ in range(50)
    )


# --- SNI ---------------------------------------------------------------------------------------


def handshake(server_context: ssl.SSLContext, name: str, ca: TestCA) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the client's side once done (or raises)."""
    client_context = ssl.create_default_context(cadata=ca.pem)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname=name)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


def bundle(ca: TestCA, domain: str) -> CertificateBundle:
    issued = ca.issue(domain)
    return CertificateBundle(
        domain=domain, certificate=issued.certificate_pem, private_key=issued.private_key_pem
    )


def test_sni_picks_the_domains_certificate_and_refuses_unknown_names() -> None:
    ca = TestCA()
    contexts = SniContexts()
    contexts.install(contexts.prepare([bundle(ca, "a.example.com"), bundle(ca, "b.example.com")]))
    for name in ("a.example.com", "b.example.com"):
        client = handshake(contexts.front, name, ca)  # verifies the name against the chain
        assert client.selected_alpn_protocol() in (None, "http/1.1")
    with pytest.raises(ssl.SSLError, match=r"CALLBACK_FAILED|UNRECOGNIZED_NAME"):
        handshake(contexts.front, "c.example.com", ca)


def test_unchanged_certificates_are_not_reloaded_and_bad_ones_are_refused() -> None:
    ca = TestCA()
    contexts = SniContexts()
    first = bundle(ca, "a.example.com")
    contexts.install(contexts.prepare([first]))
    before = contexts.prepare([first])[0]["a.example.com"]
    assert contexts.prepare([first])[0]["a.example.com"] is before
    broken = first.model_copy(update={"private_key": bundle(ca, "a.example.com").private_key})
    with pytest.raises(CertificateError, match=r"a\.example\.com"):
        contexts.prepare([broken])
    assert contexts.domains() == {"a.example.com"}  # still serving the last good one


def test_edges_lift_their_open_file_limit_to_the_hard_limit() -> None:
    import resource

    from kakuremichi.edge.file_limit import raise_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        raised = raise_file_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_try_again_retries_back_off_from_two_seconds_to_thirty() -> None:
    from kakuremichi.edge.control_client import TRY_AGAIN_SECONDS

    first = [backoff_delay(0, TRY_AGAIN_SECONDS) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in first)
    assert all(2.0 <= backoff_delay(1, TRY_AGAIN_SECONDS) <= 4.0 for _ in range(50))
    assert all(
        15.0 <= backoff_delay(9, TRY_AGAIN_SECONDS) <= MAX_BACKOFF_SECONDS for _ in range(50)
    )
    assert len({round(d, 3) for d in first}) > 100  # spread out: not a stampede


def test_the_control_channels_failure_throttle_forgets() -> None:
    from kakuremichi.control.channel import FAILURE_WINDOW_SECONDS, FailureThrottle

    clock = [1000.0]
    throttle = FailureThrottle(now=lambda: clock[0])
    for _ in range(8):
        throttle.record("198.51.100.1")
    assert throttle.delay("198.51.100.1") > 0
    for n in range(1000):  # many addresses failing once each
        throttle.record(f"203.0.113.{n % 250}:{n}")
    clock[0] += FAILURE_WINDOW_SECONDS + 1
    assert throttle.delay("198.51.100.1") == 0.0
    throttle.record("192.0.2.1")  # the next failure prunes the old ones
    assert throttle.tracked() == 1
