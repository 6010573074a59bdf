"""Operator settings, from the command line (``kakuremichi operator --help``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kakuremichi import __version__
from kakuremichi.control.addressing import SubnetPool
from kakuremichi.control.manifests import EdgeImage

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


class ControlSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    db_url: str = "sqlite:///kakuremichi.db"
    """The SQLite mirror."""
    control_listen: str = "127.0.0.1:8480"
    """host:port the control channel (WebSocket) listens on."""
    control_tls_cert: Path | None = None
    control_tls_key: Path | None = None
    """Serve the control channel over TLS with this certificate (chain) and key. Without TLS,
    private keys are sent only to edges connecting over loopback."""
    control_url: str = "http://127.0.0.1:8480"
    """The URL edges use to reach the control channel (printed in one-liners, set in sidecars)."""
    sealing_key_file: Path | None = None
    """Master key that seals secrets in the database; generated next to the database if unset."""
    subnet_first: int = 1
    subnet_last: int = 254
    subnet_excluded: tuple[str, ...] = ()
    subnet_third_octets: int = 1
    """K: agent subnets 10.N.M.0/24 for M in 0..K-1. 1 is the data-model document's plan
    (10.N.0.0/24, 254 agents); a larger K enlarges the pool (all 10.N.0.0/24 go first)."""
    edge_ca_file: Path | None = None
    """CA bundle (PEM) that in-cluster edges trust for ``control_url``: put into the gateway
    DaemonSets and agent sidecars as ``KAKUREMICHI_CONTROL_CA`` (a CA is public; this spares
    copying a Secret into every namespace)."""
    edge_wheel: Path | None = None
    """The kakuremichi wheel of this release, served to the one-line installer at
    ``/install/<wheel name>`` (None: hosts install from the package index)."""
    edge_image: str = f"kakuremichi/edge:{__version__}"
    """Image of the gateway DaemonSets and agent sidecars."""
    system_namespace: str = "default"
    """Namespace for the Secrets of cluster-scoped resources (Gateways)."""
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means the whole cluster."""
    webhook_listen: str | None = None
    """host:port of the sidecar-injection webhook; None disables it."""
    webhook_service: str | None = None
    """``NAMESPACE/NAME:PORT`` of a Service in front of the webhook: registered by Service
    reference (in a cluster), instead of ``https://webhook_host:port``."""
    webhook_host: str = "127.0.0.1"
    """The name or address the API server uses to reach the webhook (in its certificate)."""
    webhook_cert_dir: Path | None = None
    """Where the webhook's serving certificate is written; a fresh private temporary folder
    when unset."""
    acme_directory: str = LETS_ENCRYPT
    """ACME directory URL: Let's Encrypt production by default; staging is
    https://acme-staging-v02.api.letsencrypt.org/directory; any RFC 8555 server works."""
    acme_email: str | None = None
    """Contact address for the ACME account (expiry notices)."""
    acme_eab_kid: str | None = None
    acme_eab_hmac_key: str | None = None
    """External Account Binding, for CAs that require it (base64url HMAC key)."""
    acme_ca_file: Path | None = None
    """CA bundle to trust for the directory's HTTPS (default: the system's)."""
    acme_profile: str | None = None
    """Certificate profile to request, for servers that offer profiles."""
    acme_account_secret: str = "kakuremichi-acme-account"  # noqa: S105 - a name, not a secret
    """Secret (system namespace) holding the account key and URI."""
    acme_retry_base: float = Field(default=30.0, gt=0)
    """First delay after a failed attempt; each failure doubles it, up to an hour."""
    heartbeat_timeout: float = Field(default=30.0, gt=0)
    """Seconds of silence after which an edge is offline."""
    sealing_key_secret: str | None = None
    """Keep the sealing key in this Secret of the system namespace (created on first start,
    from a key file beside the database if one is there, which is then removed), never on the
    database's volume."""
    trust_loopback: bool = False
    """Send private keys and certificates over plain HTTP to edges connecting from loopback
    (a mesh sidecar relays other hosts' connections from 127.0.0.6: off by default)."""
    max_unauthenticated: int = Field(default=256, ge=1)
    """Control channel connections that have not authenticated yet, in all."""
    max_unauthenticated_per_address: int = Field(default=64, ge=1)
    """... and from one address (edges behind one NAT share it)."""

    def edge(self) -> EdgeImage:
        """What the operator renders into gateway DaemonSets and agent sidecars."""
        ca = self.edge_ca_file.read_text() if self.edge_ca_file else None
        return EdgeImage(self.edge_image, self.control_url, control_ca=ca)

    def subnet_pool(self) -> SubnetPool:
        return SubnetPool.parse(
            self.subnet_first, self.subnet_last, self.subnet_excluded, self.subnet_third_octets
        )
