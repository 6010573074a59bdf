"""The operator's ACME session against Pebble: an order made before a restart is picked up by
its URL afterwards (same challenge, nothing ordered twice), and an order finalized before a
restart is downloaded rather than ordered again."""

from __future__ import annotations

import sys
from datetime import UTC
from pathlib import Path

import pytest
from cryptography import x509

from kakuremichi.control.acme import AcmeSession, generate_account_key, generate_certificate_key
from tests.infra import netns, pebble
from tests.infra.polling import wait_until

pytestmark = pytest.mark.acme


def test_an_order_survives_a_restart_by_its_url(
    make_host: netns.HostFactory, pebble_server: pebble.Pebble, tmp_path: Path
) -> None:
    gateway = make_host("gateway")
    _, address = netns.link_root(gateway, "192.168.243.0")
    domain = "resume.example.test"
    pebble_server.add_a(domain, str(address.ip))
    ca = str(pebble_server.ca_bundle)

    account_key = generate_account_key()
    before = AcmeSession(pebble_server.directory_url, account_key, ca)
    account = before.register("admin@example.com")
    order = before.new_order(domain, None)
    assert order.status == "pending" and len(order.challenges) == 1

    # "Restart": a new session from what was persisted (key, account URI, order URL).
    after = AcmeSession(pebble_server.directory_url, account_key, ca, account)
    resumed = after.order(order.url)
    assert resumed is not None and resumed.status == "pending"
    (token, challenge), (first_token, _) = resumed.challenges[0], order.challenges[0]
    assert token == first_token

    webroot = tmp_path / "webroot"
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    (webroot / ".well-known" / "acme-challenge" / token).write_text(
        after.key_authorization(challenge)
    )
    gateway.spawn([sys.executable, "-m", "http.server", "80", "--directory", str(webroot)])
    wait_until(
        lambda: "200" in gateway.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"http://127.0.0.1/.well-known/acme-challenge/{token}",
                                      check=False),
        "the token to be served",
    )  # fmt: skip
    after.answer(challenge)
    key = generate_certificate_key()
    chain = after.finalize(order.url, key, domain)
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [domain]

    # Finalized before another "restart": the certificate is downloaded, not ordered again.
    again = AcmeSession(pebble_server.directory_url, account_key, ca, account)
    done = again.order(order.url)
    assert done is not None and done.status == "valid" and not done.challenges
    assert again.finalize(order.url, key, domain) == chain

    # The server's renewal window (ARI) for it: inside the certificate's validity.
    suggested, recheck = again.renewal_window_start(chain)
    assert suggested is not None and recheck is not None
    assert leaf.not_valid_before_utc <= suggested.astimezone(UTC) <= leaf.not_valid_after_utc
