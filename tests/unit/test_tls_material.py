"""A user's kubernetes.io/tls Secret is served only when it is right for the domain, now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kakuremichi.control.tls_material import CertificateProblem, covers, inspect
from tests.infra.tlsgen import TestCA


def now() -> datetime:
    """Read per test: a module-level "now" goes stale when the suite runs for minutes."""
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def test_valid_material_is_described(ca: TestCA) -> None:
    issued = ca.issue("app.example.com", valid_for=timedelta(days=90))
    chain = (issued.certificate_pem + ca.pem).encode()
    info = inspect(chain, issued.private_key_pem.encode(), "app.example.com", now())
    assert info.dns_names == ("app.example.com",)
    assert info.not_before < now() < info.not_after
    assert info.renewal_time() == info.not_before + (info.not_after - info.not_before) * 2 / 3


def test_wildcard_certificates_cover_one_level(ca: TestCA) -> None:
    issued = ca.issue("*.example.com")
    inspect(
        issued.certificate_pem.encode(), issued.private_key_pem.encode(), "a.example.com", now()
    )
    assert covers("*.example.com", "a.example.com")
    assert not covers("*.example.com", "a.b.example.com")
    assert not covers("*.example.com", "example.com")


def other_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("case", "reason", "message"),
    [
        ("garbage-cert", "InvalidCertificate", "tls.crt holds no PEM certificate"),
        ("garbage-key", "InvalidPrivateKey", "tls.key holds no unencrypted PEM private key"),
        ("other-key", "KeyMismatch", "does not belong"),
        ("other-domain", "DomainMismatch", "covers other.example.com, not app.example.com"),
        ("expired", "Expired", "expired at"),
        ("future", "NotYetValid", "valid only from"),
    ],
)
def test_problems_say_what_to_fix(ca: TestCA, case: str, reason: str, message: str) -> None:
    issued = ca.issue("app.example.com")
    chain, key = issued.certificate_pem.encode(), issued.private_key_pem.encode()
    if case == "garbage-cert":
        chain = b"not a certificate"
    elif case == "garbage-key":
        key = b"not a key"
    elif case == "other-key":
        key = other_key_pem()
    elif case == "other-domain":
        other = ca.issue("other.example.com")
        chain, key = other.certificate_pem.encode(), other.private_key_pem.encode()
    elif case == "expired":
        old = ca.issue(
            "app.example.com", not_before=now() - timedelta(days=10), valid_for=timedelta(days=1)
        )
        chain, key = old.certificate_pem.encode(), old.private_key_pem.encode()
    elif case == "future":
        later = ca.issue("app.example.com", not_before=now() + timedelta(days=1))
        chain, key = later.certificate_pem.encode(), later.private_key_pem.encode()
    with pytest.raises(CertificateProblem, match=message) as problem:
        inspect(chain, key, "app.example.com", now())
    assert problem.value.reason == reason
