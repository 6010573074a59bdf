"""TLS server contexts chosen by SNI from the certificates control pushed.

A name with no certificate gets a handshake failure (``unrecognized_name``), never another
domain's certificate. Contexts are rebuilt only for certificates whose PEM (or protocol) changed,
so a push that repeats them costs nothing and open connections keep what they negotiated.

ALPN is per domain: ``http/1.1`` for tunnels whose target speaks HTTP/1.1, ``h2`` for those
whose target speaks h2c (the connection is then passed through; a client that does not offer
``h2`` negotiates nothing and is answered 505 over HTTP/1.1).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from kakuremichi.api.protocol import CertificateBundle

TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip
"""TLS 1.2: forward secrecy and AEAD only (no CBC: LUCKY13 and friends). TLS 1.3 keeps
OpenSSL's defaults (all AEAD)."""
ALPN = ["http/1.1"]
ALPN_H2 = ["h2"]


class DomainContext(ssl.SSLContext):
    """A server context that remembers which domain it serves."""

    domain: str = ""


class CertificateError(ValueError):
    pass


def _server_context(
    cls: type[ssl.SSLContext] = ssl.SSLContext, alpn: list[str] = ALPN
) -> ssl.SSLContext:
    context = cls(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(alpn)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _fingerprint(bundle: CertificateBundle, h2: bool) -> str:
    digest = hashlib.sha256(bundle.certificate.encode())
    digest.update(bundle.private_key.encode())
    digest.update(b"h2" if h2 else b"http/1.1")
    return digest.hexdigest()


def load_context(bundle: CertificateBundle, h2: bool = False) -> DomainContext:
    """A context serving ``bundle`` (offering ALPN ``h2`` alone when ``h2``). ``ssl`` loads keys
    only from files: they are written to a private folder (mode 0700, on /dev/shm when it
    exists) and removed at once."""
    context = _server_context(DomainContext, ALPN_H2 if h2 else ALPN)
    assert isinstance(context, DomainContext)
    context.domain = bundle.domain
    shm = "/dev/shm"  # noqa: S108 - mkdtemp below makes a private 0700 folder; RAM, not disk
    base = shm if os.path.isdir(shm) else None
    with tempfile.TemporaryDirectory(prefix="kakuremichi-tls-", dir=base) as folder:
        chain, key = Path(folder, "chain.pem"), Path(folder, "key.pem")
        for path, text in ((chain, bundle.certificate), (key, bundle.private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
        try:
            context.load_cert_chain(chain, key)
        except (ssl.SSLError, ValueError) as error:
            raise CertificateError(f"certificate for {bundle.domain}: {error}") from None
    return context


PreparedCertificates = tuple[dict[str, "DomainContext"], dict[str, str]]
"""Contexts and fingerprints by domain, loaded and not served yet."""


class SniContexts:
    """Domain → context, and the front context whose SNI callback picks among them."""

    def __init__(self) -> None:
        self._contexts: dict[str, DomainContext] = {}
        self._fingerprints: dict[str, str] = {}
        self.front = _server_context()
        self.front.sni_callback = self._choose

    def prepare(
        self, bundles: Iterable[CertificateBundle], h2_domains: Collection[str] = ()
    ) -> PreparedCertificates:
        """Load what changed (may raise :class:`CertificateError`) without serving it yet;
        ``h2_domains`` offer HTTP/2 (their targets speak h2c)."""
        contexts: dict[str, DomainContext] = {}
        fingerprints: dict[str, str] = {}
        for bundle in bundles:
            domain = bundle.domain.lower()
            h2 = domain in h2_domains
            fingerprint = _fingerprint(bundle, h2)
            if self._fingerprints.get(domain) == fingerprint:
                contexts[domain] = self._contexts[domain]
            else:
                contexts[domain] = load_context(bundle, h2)
            fingerprints[domain] = fingerprint
        return contexts, fingerprints

    def install(self, prepared: PreparedCertificates) -> None:
        self._contexts, self._fingerprints = prepared

    def domains(self) -> set[str]:
        return set(self._contexts)

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> int | None:
        context = self._contexts.get(name.lower()) if name else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        connection.context = context
        return None
