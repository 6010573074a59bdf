"""Edge settings, from the command line and the environment (`kakuremichi gateway|agent -h`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from kakuremichi.api.protocol import Port
from kakuremichi.edge.firewall_rules import interface_name

WireGuardChoice = Literal["auto", "kernel", "userspace"]


class EdgeSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    control_url: str
    """Where control is, http(s)://host[:port]; the WebSocket is at /ws."""
    api_key: SecretStr
    node_name: str | None = None
    """In-cluster gateway pods: the node they run on (with the pool's key)."""
    pod_token_file: Path | None = None
    """In-cluster gateway pods: their projected ServiceAccount token, read at every connection
    (the kubelet renews it), which proves to control that the pod is its pool's on that node."""
    ca_file: Path | None = None
    """CA bundle to trust for an https control URL, besides the system's (SSL_CERT_FILE works
    too)."""
    ca_pem: str | None = None
    """The same as PEM text (``KAKUREMICHI_CONTROL_CA``, set by the operator's manifests)."""
    private_key_file: Path | None = None
    """WireGuard private key; without it, the key control sends over TLS or loopback."""
    state_dir: Path | None = None
    """Where the last applied config is kept, so that a restart serves it while control is away
    (None: kept in memory only)."""
    wireguard_interface: str = Field(default="kmedge0", max_length=15)
    """``km`` and 1-13 of ``[a-z0-9-]``: the edge's packet filter matches only it."""
    wireguard_mode: WireGuardChoice = "auto"
    firewall: bool = True
    """The packet filter on the WireGuard interface and the agent relay's binding to it
    (``--no-firewall`` turns both off; the relay still takes only its gateways' addresses)."""
    metrics_listen: str | None = None
    """host:port of /metrics and /healthz; None disables them."""
    status_interval: float = Field(default=30.0, gt=0)
    # gateways only
    listen_address: str | None = None
    """Address the HTTP and HTTPS ports bind to; None: every address."""
    http_port: Port | None = None
    https_port: Port | None = None
    wireguard_port: Port | None = None
    """Override the Gateway's ports from control's config."""
    workers: int = Field(default=1, ge=1, le=256)
    """Processes serving the HTTPS port (the gateway's own included)."""

    @field_validator("wireguard_interface")
    @classmethod
    def _interface(cls, value: str) -> str:
        return interface_name(value)

    @field_validator("control_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def websocket_url(self) -> str:
        return f"{self.control_url}/ws"


class MissingApiKey(ValueError):
    pass


def read_api_key(explicit: str | None, key_file: Path | None) -> str:
    """``--api-key``, else ``--api-key-file``, else ``KAKUREMICHI_API_KEY``."""
    if explicit:
        return explicit.strip()
    if key_file is not None:
        try:
            value = key_file.read_text().strip()
        except OSError as error:
            raise MissingApiKey(f"--api-key-file {key_file}: {error.strerror}") from None
        if not value:
            raise MissingApiKey(f"--api-key-file {key_file} is empty")
        return value
    value = os.environ.get("KAKUREMICHI_API_KEY", "").strip()
    if not value:
        raise MissingApiKey("no API key: give --api-key, --api-key-file or KAKUREMICHI_API_KEY")
    return value


def read_private_key(path: Path | None) -> str | None:
    """The WireGuard private key in ``--private-key-file``, checked for shape."""
    if path is None:
        return None
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise ValueError(f"--private-key-file {path}: {error.strerror}") from None
    if len(key) != 44 or not key.endswith("="):
        raise ValueError(f"--private-key-file {path}: not a WireGuard key (base64, 44 characters)")
    return key
