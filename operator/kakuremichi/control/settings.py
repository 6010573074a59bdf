"""Operator settings (``kakuremichi operator --help``): each field with a :class:`Flag` is an
option of the command, its help and its row in the README's table (``control/flags.py``)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kakuremichi import __version__
from kakuremichi.control.addressing import SubnetPool
from kakuremichi.control.flags import Flag
from kakuremichi.control.manifests import EdgeImage

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
ACME = "ACME (Tunnels and Certificates with issuer ACME)"


_CONTROL_URL = re.compile(
    r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$"
)


class ControlSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    db_url: Annotated[
        str,
        Flag(
            "--db",
            "the SQLite mirror (sqlite:///PATH); created and migrated at start",
            "URL",
        ),
    ] = "sqlite:///kakuremichi.db"
    control_listen: Annotated[
        str,
        Flag(
            "--control-listen",
            "where the control channel (WebSocket) listens",
            "HOST:PORT",
        ),
    ] = "127.0.0.1:8480"
    control_url: Annotated[
        str,
        Flag(
            "--control-url",
            "how edges reach the control channel (printed in one-liners, set in "
            "sidecars and DaemonSets)",
            "URL",
        ),
    ] = "http://127.0.0.1:8480"
    control_tls_cert: Annotated[
        Path | None,
        Flag(
            "--control-tls-cert",
            "serve the control channel over TLS with this certificate "
            "(chain); without TLS private keys and certificates go to no edge (but loopback ones "
            "with --trust-loopback)",
            "FILE",
        ),
    ] = None
    control_tls_key: Annotated[
        Path | None,
        Flag(
            "--control-tls-key",
            "... and this key (the two go together)",
            "FILE",
        ),
    ] = None
    trust_loopback: Annotated[
        bool,
        Flag(
            "--trust-loopback",
            "also send keys and certificates over plain HTTP to edges "
            "connecting from loopback (off: a mesh sidecar relays remote connections from "
            "127.0.0.6)",
        ),
    ] = False
    max_unauthenticated: Annotated[
        int,
        Field(ge=1),
        Flag(
            "--max-unauthenticated",
            "control channel connections not yet authenticated, in all; more get HTTP 503",
            "N",
        ),
    ] = 256
    max_unauthenticated_per_address: Annotated[
        int,
        Field(ge=1),
        Flag(
            "--max-unauthenticated-per-address",
            "... and from one address (edges behind one NAT share it)",
            "N",
        ),
    ] = 64
    heartbeat_timeout: Annotated[
        float,
        Field(gt=0),
        Flag(
            "--heartbeat-timeout",
            "an edge silent this long is disconnected and marked offline",
            "SECONDS",
            default_text="30 s",
        ),
    ] = 30.0
    namespaces: Annotated[
        tuple[str, ...],
        Flag(
            "--namespace",
            "watch only this namespace; without it, every namespace",
            "NS",
            default_text="all namespaces",
        ),
    ] = ()
    system_namespace: Annotated[
        str,
        Flag(
            "--system-namespace",
            "where Gateway Secrets, ServiceAccounts and DaemonSets live",
            "NS",
            env="POD_NAMESPACE",
            default_text="$POD_NAMESPACE or default",
        ),
    ] = "default"
    cluster_agent: Annotated[
        str | None,
        Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"),
        Flag(
            "--cluster-agent",
            "the Agent that serves Ingresses of class kakuremichi, reaching their Services' "
            "endpoints; without it, Ingresses are not watched",
            "NS/NAME",
            env="KAKUREMICHI_CLUSTER_AGENT",
        ),
    ] = None
    endpoint_ranges: Annotated[
        tuple[str, ...],
        Flag(
            "--endpoint-range",
            "besides the pods of a route's own namespace, the addresses its EndpointSlices may "
            "name (e.g. servers outside the cluster); none by default",
            "CIDR",
        ),
    ] = ()
    subnet_range: Annotated[
        str,
        Field(pattern=r"^\d{1,3}(-\d{1,3})?$"),
        Flag(
            "--subnet-pool",
            "agent subnets 10.N.0.0/24 for N in FIRST..LAST",
            "FIRST-LAST",
        ),
    ] = "1-254"
    subnet_excluded: Annotated[
        tuple[str, ...],
        Flag(
            "--exclude-cidr",
            "skip agent subnets overlapping CIDR (your cluster's ranges, e.g. 10.96.0.0/12)",
            "CIDR",
        ),
    ] = ()
    subnet_third_octets: Annotated[
        int,
        Flag(
            "--subnet-third-octets",
            "enlarge the agent pool to 10.N.M.0/24 for M in 0..K-1 "
            "(1..256; 254 x K agents, virtual IP 10.N.M.100); every 10.N.0.0/24 is handed out "
            "first, so enlarging moves nobody. 1 is the data-model document's plan",
            "K",
            env="KAKUREMICHI_SUBNET_THIRD_OCTETS",
        ),
    ] = 1
    webhook_listen: Annotated[
        str | None,
        Flag(
            "--webhook-listen",
            "serve the agent sidecar-injection webhook here (off without it)",
            "HOST:PORT",
        ),
    ] = None
    webhook_host: Annotated[
        str,
        Flag(
            "--webhook-host",
            "the name or address the API server dials for the webhook (its "
            "certificate's SAN): https://HOST:PORT",
            "HOST",
        ),
    ] = "127.0.0.1"
    webhook_service: Annotated[
        str | None,
        Flag(
            "--webhook-service",
            "register the webhook by this Service instead of --webhook-host "
            "(in a cluster; what the chart does)",
            "NAMESPACE/NAME:PORT",
        ),
    ] = None
    webhook_cert_dir: Annotated[
        Path | None,
        Flag(
            "--webhook-cert-dir",
            "where the webhook's generated serving certificate is written",
            "DIR",
            default_text="a private temporary folder",
        ),
    ] = None
    edge_image: Annotated[
        str,
        Flag(
            "--edge-image",
            "image of gateway DaemonSets and agent sidecars",
            "IMAGE",
            default_text="kakuremichi/edge:<version>",
        ),
    ] = f"kakuremichi/edge:{__version__}"
    edge_ca_file: Annotated[
        Path | None,
        Flag(
            "--edge-ca-file",
            "a private CA (PEM) for --control-url, rendered into gateway "
            "DaemonSets and agent sidecars (KAKUREMICHI_CONTROL_CA)",
            "FILE",
        ),
    ] = None
    edge_wheel: Annotated[
        Path | None,
        Flag(
            "--edge-wheel",
            "the kakuremichi wheel of this release that the one-line installer "
            "fetches from control (none outside the image: hosts install from the package index)",
            "FILE",
            default_text="the image's "
            "/usr/share/kakuremichi/kakuremichi-<version>-py3-none-any.whl",
        ),
    ] = None
    edge_wheelhouse: Annotated[
        Path | None,
        Flag(
            "--edge-wheelhouse",
            "a folder of wheels: this release's and every dependency's, served at "
            "/install/wheels/; the one-line installer then installs from it alone (pip "
            "--no-index), so hosts need no package index",
            "DIR",
            default_text="the image's /usr/share/kakuremichi/wheels",
        ),
    ] = None
    edge_wireguard_go: Annotated[
        Path | None,
        Flag(
            "--edge-wireguard-go",
            "a folder with wireguard-go builds (wireguard-go-linux-amd64, -arm64), served to "
            "the one-line installer for hosts without kernel WireGuard, their SHA-256 in the "
            "script",
            "DIR",
            default_text="the image's /usr/share/kakuremichi",
        ),
    ] = None
    sealing_key_file: Annotated[
        Path | None,
        Flag(
            "--sealing-key-file",
            "the key that seals secrets in the database",
            "FILE",
            default_text="sealing.key beside the database",
        ),
    ] = None
    sealing_key_secret: Annotated[
        str | None,
        Flag(
            "--sealing-key-secret",
            "keep that key in this Secret of the system namespace instead "
            "(created on first start; a key file beside the database is moved into it and "
            "removed), so a copy of the data volume does not hold the key to its sealed values; "
            "the chart sets it",
            "NAME",
        ),
    ] = None
    acme_directory: Annotated[
        str,
        Flag(
            "--acme-directory",
            "ACME directory for issuer ACME (the default for Tunnels); staging "
            f"is {LETS_ENCRYPT_STAGING}; any RFC 8555 server works",
            "URL",
            env="KAKUREMICHI_ACME_DIRECTORY",
            default_text="Let's Encrypt production",
            group=ACME,
        ),
    ] = LETS_ENCRYPT
    acme_email: Annotated[
        str | None,
        Flag(
            "--acme-email",
            "account contact (expiry notices)",
            "EMAIL",
            group=ACME,
        ),
    ] = None
    acme_eab_kid: Annotated[
        str | None,
        Flag(
            "--acme-eab-kid",
            "External Account Binding key id, for CAs that require it",
            "KID",
            group=ACME,
        ),
    ] = None
    acme_eab_hmac_key: Annotated[
        str | None,
        Flag(
            "--acme-eab-hmac-key",
            "External Account Binding HMAC key, base64url",
            "KEY",
            env="KAKUREMICHI_ACME_EAB_HMAC_KEY",
            group=ACME,
        ),
    ] = None
    acme_ca_file: Annotated[
        Path | None,
        Flag(
            "--acme-ca-file",
            "CA bundle to trust for the directory's HTTPS",
            "FILE",
            default_text="the system's",
            group=ACME,
        ),
    ] = None
    acme_profile: Annotated[
        str | None,
        Flag(
            "--acme-profile",
            "certificate profile to request, for servers that offer profiles",
            "NAME",
            default_text="the server's",
            group=ACME,
        ),
    ] = None
    acme_retry_base: Annotated[
        float,
        Field(gt=0),
        Flag(
            "--acme-retry-base",
            "delay after a first failure; doubles per failure, up to an hour (Retry-After wins)",
            "SECONDS",
            default_text="30 s",
            group=ACME,
        ),
    ] = 30.0
    acme_account_secret: str = "kakuremichi-acme-account"  # noqa: S105 - a name, not a secret
    """Secret (system namespace) holding the ACME account key and URI."""

    @model_validator(mode="after")
    def _together(self) -> ControlSettings:
        if not _CONTROL_URL.match(self.control_url):
            raise ValueError(
                f"--control-url: {self.control_url!r} must be http:// or https://, a host name or "
                "address, maybe a port and a path, and nothing else (it is written into the "
                "installer scripts that hosts run as root)"
            )
        if self.cluster_agent is not None and self.namespaces:
            raise ValueError(
                "--cluster-agent: Ingresses are served only when every namespace is watched "
                "(no --namespace): which addresses belong to other tenants' pods is known only "
                "then"
            )
        for text in self.endpoint_ranges:
            try:
                ipaddress.ip_network(text)
            except ValueError:
                raise ValueError(
                    f"--endpoint-range: {text!r} is not a network such as 192.168.10.0/24"
                ) from None
        if (self.control_tls_cert is None) != (self.control_tls_key is None):
            raise ValueError("--control-tls-cert and --control-tls-key go together")
        try:
            self.subnet_pool()  # a bad pool is refused before anything connects anywhere
        except ValueError as error:
            raise ValueError(
                f"--subnet-pool/--subnet-third-octets/--exclude-cidr: {error}"
            ) from None
        return self

    def cluster_agent_key(self) -> tuple[str, str] | None:
        """(namespace, name) of ``--cluster-agent``."""
        if self.cluster_agent is None:
            return None
        namespace, _, name = self.cluster_agent.partition("/")
        return namespace, name

    def edge(self) -> EdgeImage:
        """What the operator renders into gateway DaemonSets and agent sidecars."""
        ca = self.edge_ca_file.read_text() if self.edge_ca_file else None
        return EdgeImage(self.edge_image, self.control_url, control_ca=ca)

    def subnet_pool(self) -> SubnetPool:
        first, _, last = self.subnet_range.partition("-")
        return SubnetPool.parse(
            int(first), int(last or first), self.subnet_excluded, self.subnet_third_octets
        )
