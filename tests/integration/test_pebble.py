"""Pebble issues a certificate after validating HTTP-01 on a test host, and the chain verifies
against Pebble's root: the ACME fixture works end to end with a real ACME client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from acme import challenges, client, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from josepy import jwa, jwk

from tests.infra import netns, pebble
from tests.infra.polling import wait_until

T = TypeVar("T")


def patiently(call: Callable[[], T]) -> T:
    """Pebble rejects 5% of nonces on purpose; the acme client retries only once."""
    for _ in range(5):
        try:
            return call()
        except messages.Error as error:
            if error.code != "badNonce":
                raise
    return call()


def test_pebble_issues_after_http01_on_a_test_host(
    make_host: netns.HostFactory, pebble_server: pebble.Pebble, tmp_path: Path
) -> None:
    gateway = make_host("gateway")
    _, gateway_address = netns.link_root(gateway, "192.168.242.0")
    domain = "pebble-check.example.test"
    pebble_server.add_a(domain, str(gateway_address.ip))

    account_key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    network = client.ClientNetwork(
        account_key,
        alg=jwa.ES256,
        user_agent="kakuremichi-tests",
        verify_ssl=str(pebble_server.ca_bundle),  # type: ignore[arg-type]  # requests takes a CA path
    )
    directory = messages.Directory.from_json(network.get(pebble_server.directory_url).json())
    acme = client.ClientV2(directory, network)
    patiently(
        lambda: acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    )

    certificate_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(certificate_key, hashes.SHA256())
    )
    order = patiently(lambda: acme.new_order(csr.public_bytes(serialization.Encoding.PEM)))
    (authorization,) = order.authorizations
    http01 = next(
        c for c in authorization.body.challenges if isinstance(c.chall, challenges.HTTP01)
    )
    response, validation = http01.response_and_validation(account_key)

    webroot = tmp_path / "webroot"
    token_file = webroot / ".well-known" / "acme-challenge" / http01.chall.encode("token")
    token_file.parent.mkdir(parents=True)
    token_file.write_text(validation)
    gateway.spawn(["python3", "-m", "http.server", "80", "--bind", str(gateway_address.ip),
                   "--directory", str(webroot)])  # fmt: skip
    wait_until(
        lambda: gateway.exec("curl", "-sf", f"http://{gateway_address.ip}/.well-known/acme-challenge/"
                             + http01.chall.encode("token"), check=False) == validation,
        "the challenge file to be served",
    )  # fmt: skip
    patiently(lambda: acme.answer_challenge(http01, response))
    finalized = patiently(lambda: acme.poll_and_finalize(order))

    chain = x509.load_pem_x509_certificates(finalized.fullchain_pem.encode())
    root = x509.load_pem_x509_certificate(pebble_server.root_pem().encode())
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(domain))
    verifier.verify(chain[0], chain[1:])
    assert chain[0].public_key() == certificate_key.public_key()
