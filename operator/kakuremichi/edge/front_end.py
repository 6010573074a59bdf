"""The HTTPS port of one gateway process: its certificates by SNI and its proxy, changed
together from a :class:`~kakuremichi.edge.gateway_routes.FrontEndConfig`.

Two steps, so that a gateway can do other work between them: :meth:`HttpsFrontEnd.prepare`
does everything that can fail (parsing certificates) and changes nothing; :meth:`install`
swaps certificates, limits and routes in one go and cannot fail. The gateway process and each
HTTPS worker process serve their configs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.edge.gateway_routes import FrontEndConfig
from kakuremichi.edge.https_proxy import HttpsProxy
from kakuremichi.edge.sni import PreparedCertificates, SniContexts
from kakuremichi.edge.stats import EdgeStats


@dataclass(frozen=True)
class PreparedFrontEnd:
    config: FrontEndConfig
    certificates: PreparedCertificates


class HttpsFrontEnd:
    def __init__(self, stats: EdgeStats, relay_port: int = RELAY_PORT) -> None:
        self.sni = SniContexts()
        self.proxy = HttpsProxy(stats, relay_port)

    def prepare(self, config: FrontEndConfig) -> PreparedFrontEnd:
        """Check and load the certificates (``CertificateError`` names the bad one)."""
        return PreparedFrontEnd(config, self.sni.prepare(config.certificates, config.h2c_domains()))

    def install(self, prepared: PreparedFrontEnd) -> None:
        """Serve it from the next connection (certificates, limits) or request (routes) on."""
        config = prepared.config
        self.sni.install(prepared.certificates)
        self.proxy.set_front_end(
            config.client_limits, config.trusted_proxies, config.accept_proxy_protocol
        )
        self.proxy.set_routes({r.domain: r for r in config.routes})

    def serves(self, domain: str) -> bool:
        route = self.proxy.routes.get(domain)
        return route is not None and route.enabled
