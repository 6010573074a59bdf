"""Admission webhook that injects the agent sidecar into Pods labelled
``kakuremichi.io/agent: <agent name>``.

The label (not an annotation) lets the webhook configuration's object selector keep every other
Pod away from us, so an operator outage never blocks unrelated workloads. A Pod naming an unknown
Agent, or a second live Pod for an Agent (both would share one key and one address), is refused
with a message that says so. The serving certificate is made here with ``cryptography``.
"""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kakuremichi.control import manifests
from kakuremichi.control.context import Context

WEBHOOK_CONFIGURATION = "kakuremichi.io"


@dataclass(frozen=True)
class ServingCertificate:
    certfile: Path
    keyfile: Path
    ca_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def serving_certificate(directory: Path, host: str, days: int = 365) -> ServingCertificate:
    """A private CA and a serving certificate for ``host`` (a DNS name or an IP address)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("kakuremichi webhook CA"))
        .issuer_name(_name("kakuremichi webhook CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certfile, keyfile = directory / "webhook.crt", directory / "webhook.key"
    keyfile.unlink(missing_ok=True)  # never write through something planted there
    keyfile.touch(mode=0o600, exist_ok=False)
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return ServingCertificate(certfile, keyfile, ca.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class ServiceReference:
    """A Service in front of the webhook: ``NAMESPACE/NAME:PORT``."""

    namespace: str
    name: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ServiceReference:
        namespace, slash, rest = text.partition("/")
        name, colon, port = rest.partition(":")
        if not (slash and namespace and name and colon and port.isdigit()):
            raise ValueError(f"expected NAMESPACE/NAME:PORT, got {text!r}")
        return cls(namespace, name, int(port))

    @property
    def host(self) -> str:
        """The name the API server verifies in the serving certificate."""
        return f"{self.name}.{self.namespace}.svc"


class ServiceWebhookServer(kopf.WebhookServer):
    """Registers the webhook by Service reference instead of URL: the API server resolves a
    Service itself, where it could not resolve a cluster DNS name in a URL."""

    def __init__(self, service: ServiceReference, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for config in super().__call__(fn):
            reference = {"namespace": self.service.namespace, "name": self.service.name,
                         "port": self.service.port, "path": ""}  # fmt: skip
            yield {"service": reference, **({"caBundle": config["caBundle"]}
                                             if "caBundle" in config else {})}  # fmt: skip


def configure(
    settings: kopf.OperatorSettings,
    listen: str,
    host: str,
    cert_dir: Path | None,
    service: ServiceReference | None = None,
) -> None:
    """Serve the webhook on ``listen``; the API server reaches it through ``service`` when
    given, else at ``host``."""
    address, _, port = listen.rpartition(":")
    cert_dir = cert_dir or Path(tempfile.mkdtemp(prefix="kakuremichi-webhook-"))
    certificate = serving_certificate(cert_dir, service.host if service else host)
    options: dict[str, Any] = {
        "addr": address.strip("[]") or None,
        "port": int(port),
        "host": host,
        "certfile": certificate.certfile,
        "pkeyfile": certificate.keyfile,
        "cadata": certificate.ca_pem,
    }
    settings.admission.server = (
        ServiceWebhookServer(service, **options) if service else kopf.WebhookServer(**options)
    )
    settings.admission.managed = WEBHOOK_CONFIGURATION


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    @kopf.on.mutate(
        "v1", "pods", id="agent-sidecar", operations=["CREATE"],
        labels={manifests.AGENT_LABEL: kopf.PRESENT}, registry=registry,
    )  # fmt: skip
    async def inject_agent(
        body: kopf.Body, patch: kopf.Patch, namespace: str | None, **_: Any
    ) -> None:
        agent_name = body.metadata.labels.get(manifests.AGENT_LABEL, "")
        namespace = namespace or body.metadata.namespace or ""
        agent = next(
            (a for a in context.state.agents.values()
             if (a.namespace, a.name) == (namespace, agent_name)),
            None,
        )  # fmt: skip
        location = context.state.credential_secrets.get(agent.id) if agent else None
        if agent is None or location is None:
            raise kopf.AdmissionError(
                f"label {manifests.AGENT_LABEL}={agent_name}: there is no provisioned Agent "
                f"{agent_name} in namespace {namespace}",
                code=400,
            )
        live = await context.kube.live_pods(namespace, f"{manifests.AGENT_LABEL}={agent_name}")
        if live:
            raise kopf.AdmissionError(
                f"Agent {agent_name} already runs in Pod {live[0]}: one Agent is one WireGuard "
                "identity and address, so it can serve one Pod at a time (use one Agent per "
                "replica, or a Deployment with strategy Recreate)",
                code=409,
            )
        edge = context.settings.edge()
        spec = body.get("spec", {})
        if any(c.get("name") == manifests.SIDECAR_NAME for c in spec.get("containers", [])):
            return  # already there (a re-created Pod, or the user wrote it in)
        sidecar = manifests.agent_sidecar(location[1], edge)
        patch.spec["containers"] = [*spec.get("containers", []), sidecar.container]
        patch.spec["volumes"] = [*spec.get("volumes", []), *sidecar.volumes]
