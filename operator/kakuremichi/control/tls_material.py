"""Certificate material as it arrives in a ``kubernetes.io/tls`` Secret: parse and check it.

A Secret-backed certificate is served only when the chain parses, the leaf covers the domain,
it is valid now, and the private key belongs to the leaf. Each failure says which of these does
not hold, so the Certificate's ``Ready=False`` condition can tell the user what to fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

SERVABLE_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)


class CertificateProblem(ValueError):
    """Why certificate material cannot be served; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CertificateInfo:
    domain: str
    not_before: datetime
    not_after: datetime
    serial_number: int
    dns_names: tuple[str, ...]

    def renewal_time(self, fraction: float = 2 / 3) -> datetime:
        """When renewal is due: ``fraction`` of the lifetime after ``not_before``."""
        lifetime = self.not_after - self.not_before
        return self.not_before + timedelta(seconds=lifetime.total_seconds() * fraction)


def covers(pattern: str, domain: str) -> bool:
    """Whether a certificate name (possibly ``*.example.com``) covers ``domain``."""
    pattern, domain = pattern.lower().rstrip("."), domain.lower().rstrip(".")
    if pattern == domain:
        return True
    if pattern.startswith("*."):
        head, _, rest = domain.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def inspect(chain_pem: bytes, key_pem: bytes, domain: str, now: datetime) -> CertificateInfo:
    """Check a PEM chain (leaf first) and PEM private key for serving ``domain`` at ``now``."""
    names, not_before, not_after, serial_number = _parse(chain_pem, key_pem)
    if not any(covers(name, domain) for name in names):
        shown = ", ".join(names) or "no DNS names"
        raise CertificateProblem("DomainMismatch", f"the certificate covers {shown}, not {domain}")
    if now < not_before:
        raise CertificateProblem("NotYetValid", f"the certificate is valid only from {not_before}")
    if now >= not_after:
        raise CertificateProblem("Expired", f"the certificate expired at {not_after}")
    return CertificateInfo(
        domain=domain,
        not_before=not_before,
        not_after=not_after,
        serial_number=serial_number,
        dns_names=names,
    )


@functools.lru_cache(maxsize=64)
def _parse(chain_pem: bytes, key_pem: bytes) -> tuple[tuple[str, ...], datetime, datetime, int]:
    """The leaf's DNS names, validity and serial number, once the key is known to match it.

    Cached by content: thousands of Certificates often share one wildcard Secret, and loading
    (and checking) its private key costs far more than the checks that depend on the domain and
    the time. Failures are not cached (they raise)."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise CertificateProblem("InvalidCertificate", "tls.crt holds no PEM certificate") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateProblem(
            "InvalidPrivateKey", "tls.key holds no unencrypted PEM private key"
        ) from None
    if not isinstance(key, SERVABLE_KEY_TYPES):
        raise CertificateProblem(
            "InvalidPrivateKey", f"tls.key is a {type(key).__name__}, not RSA, ECDSA or Ed25519"
        )
    if key.public_key() != leaf.public_key():
        raise CertificateProblem(
            "KeyMismatch", "tls.key does not belong to the first certificate of tls.crt"
        )
    names = tuple(_dns_names(leaf))
    return names, leaf.not_valid_before_utc, leaf.not_valid_after_utc, leaf.serial_number


@functools.lru_cache(maxsize=256)
def names_only(chain_pem: str, domain: str) -> bool:
    """Whether the leaf of ``chain_pem`` names ``domain`` and nothing else (no other name, no
    wildcard): an HTTP/2 connection passed whole to one backend must not be one a client may
    reuse for other hosts its certificate covers (connection coalescing)."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    except ValueError:
        return False
    return {name.lower() for name in _dns_names(leaf)} == {domain}


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        return []
    san = extension.value
    assert isinstance(san, x509.SubjectAlternativeName)
    return san.get_values_for_type(x509.DNSName)
