"""Kubernetes objects the operator creates for users' workloads, as pure functions.

- the gateway DaemonSet of an InCluster Gateway pool (host network, NET_ADMIN, /dev/net/tun for
  the userspace WireGuard fallback, the pool's API key from its Secret, the node name from the
  downward API and a projected ServiceAccount token bound to the pod, with which control checks
  that the pod is the pool's on that node before it hands the node its own identity), and the
  pool's ServiceAccount (no API access of its own);
- the agent sidecar container injected into Pods labelled ``kakuremichi.io/agent: <name>``.

Both run the same image and command as users run by hand (``kakuremichi gateway|agent``), so the
end-to-end tests start the edges with exactly these commands, arguments and credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kakuremichi.api.protocol import POD_TOKEN_AUDIENCE
from kakuremichi.api.resources import API_VERSION, GATEWAY, GatewayResources, GatewaySpec

AGENT_LABEL = "kakuremichi.io/agent"
GATEWAY_LABEL = "kakuremichi.io/gateway"
CREDENTIALS_MOUNT = "/etc/kakuremichi"
API_KEY_FILE = f"{CREDENTIALS_MOUNT}/apiKey"
PRIVATE_KEY_FILE = f"{CREDENTIALS_MOUNT}/wireguardPrivateKey"
STATE_MOUNT = "/var/lib/kakuremichi"
"""The edge's saved config (``--state-dir``): an emptyDir, so it outlives a container restart
(a crash, an OOM kill, a node reboot) but not the Pod."""
POD_TOKEN_MOUNT = "/var/run/secrets/kakuremichi.io"  # noqa: S105 - a path
POD_TOKEN_FILE = f"{POD_TOKEN_MOUNT}/token"
POD_TOKEN_SECONDS = 3600
"""Lifetime of the gateway pods' projected token (the kubelet renews it at 80 %)."""
CERTIFICATE_LABEL = "kakuremichi.io/certificate"
"""On Secrets a Certificate reads: the operator watches those (its own carry it)."""
SIDECAR_NAME = "kakuremichi-agent"
CONTROL_CA_ENV = "KAKUREMICHI_CONTROL_CA"


@dataclass(frozen=True)
class EdgeImage:
    """What edges run: the image, its pull policy, and the control URL they dial."""

    image: str
    control_url: str
    pull_policy: str = "IfNotPresent"
    control_ca: str | None = None
    """PEM of the CA the edges trust for ``control_url`` (a private CA), if any."""

    def env(self) -> list[dict[str, Any]]:
        return [{"name": CONTROL_CA_ENV, "value": self.control_ca}] if self.control_ca else []


def _sidecar_resources() -> dict[str, Any]:
    return GatewayResources().as_container_resources()  # (the gateway's defaults suit it too)


def _tun_volume() -> dict[str, Any]:
    return {"name": "dev-net-tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}}


def _tun_mount() -> dict[str, Any]:
    return {"name": "dev-net-tun", "mountPath": "/dev/net/tun"}


def gateway_daemonset_name(gateway: str) -> str:
    return f"kakuremichi-gateway-{gateway}"


def gateway_service_account_name(gateway: str) -> str:
    return f"kakuremichi-gateway-{gateway}"


def _gateway_labels(gateway: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kakuremichi-gateway",
        "app.kubernetes.io/managed-by": "kakuremichi",
        GATEWAY_LABEL: gateway,
    }


def _owned_by_gateway(gateway: str, gateway_uid: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": API_VERSION,
            "kind": GATEWAY.kind,
            "name": gateway,
            "uid": gateway_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def gateway_service_account(gateway: str, gateway_uid: str, namespace: str) -> dict[str, Any]:
    """The identity of an InCluster pool's pods: their projected tokens name it, and control
    admits only tokens of the pool's own ServiceAccount. It is granted nothing (the gateway
    does not call the API server), and no API token is mounted with it."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": gateway_service_account_name(gateway),
            "namespace": namespace,
            "labels": _gateway_labels(gateway),
            "ownerReferences": _owned_by_gateway(gateway, gateway_uid),
        },
        "automountServiceAccountToken": False,
    }


def gateway_daemonset(
    gateway: str,
    gateway_uid: str,
    spec: GatewaySpec,
    edge: EdgeImage,
    namespace: str,
    pool_secret: str,
) -> dict[str, Any]:
    """The DaemonSet that runs one gateway instance on every selected node."""
    labels = _gateway_labels(gateway)
    ports = spec.ports
    container = {
        "name": "gateway",
        "image": edge.image,
        "imagePullPolicy": edge.pull_policy,
        "args": [
            "gateway",
            "--control-url",
            edge.control_url,
            "--api-key-file",
            API_KEY_FILE,
            "--node-name",
            "$(NODE_NAME)",
            "--pod-token-file",
            POD_TOKEN_FILE,
            "--http-port",
            str(ports.http),
            "--https-port",
            str(ports.https),
            "--wireguard-port",
            str(ports.wireguard),
            "--state-dir",
            STATE_MOUNT,
        ],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            *edge.env(),
        ],
        "ports": [
            {
                "name": "http",
                "containerPort": ports.http,
                "hostPort": ports.http,
                "protocol": "TCP",
            },
            {
                "name": "https",
                "containerPort": ports.https,
                "hostPort": ports.https,
                "protocol": "TCP",
            },
            {
                "name": "wireguard",
                "containerPort": ports.wireguard,
                "hostPort": ports.wireguard,
                "protocol": "UDP",
            },
        ],
        # Root in the container: the image's default user is unprivileged, and Kubernetes does
        # not grant added capabilities (NET_ADMIN for WireGuard) to non-root users.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_BIND_SERVICE"], "drop": ["ALL"]},
            "allowPrivilegeEscalation": False,
        },
        "volumeMounts": [
            {"name": "credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True},
            {"name": "pod-token", "mountPath": POD_TOKEN_MOUNT, "readOnly": True},
            {"name": "state", "mountPath": STATE_MOUNT},
            _tun_mount(),
        ],
        # The gateway sizes its HTTPS processes from these limits (cgroup cpu.max/memory.max).
        "resources": (spec.resources or GatewayResources()).as_container_resources(),
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": gateway_service_account_name(gateway),
        "automountServiceAccountToken": False,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "containers": [container],
        "volumes": [
            {
                "name": "credentials",
                "secret": {
                    "secretName": pool_secret,
                    "items": [{"key": "apiKey", "path": "apiKey"}],
                },
            },
            {
                "name": "pod-token",
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": POD_TOKEN_AUDIENCE,
                                "expirationSeconds": POD_TOKEN_SECONDS,
                                "path": "token",
                            }
                        }
                    ]
                },
            },
            {"name": "state", "emptyDir": {}},
            _tun_volume(),
        ],
        "terminationGracePeriodSeconds": 30,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    # (The DaemonSet is replaced whole on every change, so leaving these out removes them.)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": gateway_daemonset_name(gateway),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": _owned_by_gateway(gateway, gateway_uid),
        },
        "spec": {
            "selector": {"matchLabels": {GATEWAY_LABEL: gateway}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True)
class Sidecar:
    container: dict[str, Any]
    volumes: list[dict[str, Any]]


def agent_sidecar(credentials_secret: str, edge: EdgeImage) -> Sidecar:
    """The agent container for a Pod of the origin; credentials come from the Agent's Secret."""
    container = {
        "name": SIDECAR_NAME,
        "image": edge.image,
        "imagePullPolicy": edge.pull_policy,
        "args": [
            "agent",
            "--control-url",
            edge.control_url,
            "--api-key-file",
            API_KEY_FILE,
            "--private-key-file",
            PRIVATE_KEY_FILE,
            "--state-dir",
            STATE_MOUNT,
        ],
        **({"env": edge.env()} if edge.control_ca else {}),
        "securityContext": {  # root for NET_ADMIN, as for gateways
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
            "allowPrivilegeEscalation": False,
        },
        "volumeMounts": [
            {"name": "kakuremichi-credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True},
            {"name": "kakuremichi-state", "mountPath": STATE_MOUNT},
            {**_tun_mount(), "name": "kakuremichi-dev-net-tun"},
        ],
        "resources": _sidecar_resources(),
    }
    volumes = [
        {"name": "kakuremichi-credentials", "secret": {"secretName": credentials_secret}},
        {"name": "kakuremichi-state", "emptyDir": {}},
        {**_tun_volume(), "name": "kakuremichi-dev-net-tun"},
    ]
    return Sidecar(container, volumes)


def agent_pod_patch(
    pod: dict[str, Any], credentials_secret: str, edge: EdgeImage
) -> list[dict[str, Any]]:
    """JSON Patch operations that add the agent sidecar (and its volumes) to ``pod``.

    Idempotent: a Pod that already has the sidecar gets no operations."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if any(c.get("name") == SIDECAR_NAME for c in containers):
        return []
    sidecar = agent_sidecar(credentials_secret, edge)
    operations: list[dict[str, Any]] = [
        {"op": "add", "path": "/spec/containers/-", "value": sidecar.container}
    ]
    if spec.get("volumes"):
        operations += [
            {"op": "add", "path": "/spec/volumes/-", "value": v} for v in sidecar.volumes
        ]
    else:
        operations.append({"op": "add", "path": "/spec/volumes", "value": sidecar.volumes})
    return operations
