"""A gateway's HTTPS front end on loopback, for in-process tests: one certificate, served by an
:class:`HttpsProxy` exactly as the gateway serves it."""

from __future__ import annotations

import asyncio

from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.sni import SniContexts
from tests.infra.ports import free_port
from tests.infra.tlsgen import Issued


async def serve_https(proxy: HttpsProxy, domain: str, issued: Issued) -> tuple[asyncio.Server, int]:
    """The proxy listening on a free loopback port with ``issued`` for ``domain``; the server
    and its port."""
    sni = SniContexts()
    sni.install(sni.prepare([CertificateBundle(
        domain=domain, certificate=issued.certificate_pem, private_key=issued.private_key_pem
    )]))  # fmt: skip
    port = free_port()
    return await serve(proxy, sni.front, "127.0.0.1", port), port
