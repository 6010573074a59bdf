"""The Kubernetes calls the control plane makes beyond kopf's, as a protocol: ``Kube`` makes them
against the API server (``kube.py``); the unit tests put an in-memory cluster in its place
(``tests/infra/fake_kube.py``), so that the state, the projectors and the reconcilers are tested
fast, while the integration tier keeps the real API server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kakuremichi.api.resources import ResourceKind
from kakuremichi.control.pod_identity import PodFacts, ReviewedToken

MANAGED_BY = {"app.kubernetes.io/managed-by": "kakuremichi"}
"""The label of every object the operator makes."""


@dataclass(frozen=True)
class StoredSecret:
    data: Mapping[str, str]
    labels: Mapping[str, str]
    owners: frozenset[str]
    """Uids of its owner references."""
    uid: str
    resource_version: str

    def owned_by(self, uid: str) -> bool:
        """Made by the operator for the object ``uid`` (its owner reference and label)."""
        return uid in self.owners and all(self.labels.get(k) == v for k, v in MANAGED_BY.items())


@dataclass(frozen=True)
class BuiltinKind:
    """A kind the operator reads but does not define (Kubernetes' own, Gateway API's)."""

    group: str
    """"" for the core group."""
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


INGRESS = BuiltinKind("networking.k8s.io", "v1", "ingresses", "Ingress")
INGRESS_CLASS = BuiltinKind("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False)
SERVICE = BuiltinKind("", "v1", "services", "Service")
ENDPOINT_SLICE = BuiltinKind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
POD = BuiltinKind("", "v1", "pods", "Pod")
NODE = BuiltinKind("", "v1", "nodes", "Node", False)
NAMESPACE = BuiltinKind("", "v1", "namespaces", "Namespace", False)
GATEWAY_CLASS = BuiltinKind("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass",
                            False)  # fmt: skip
ROUTED_GATEWAY = BuiltinKind("gateway.networking.k8s.io", "v1", "gateways", "Gateway")
"""The Gateway API's Gateway (ours, the pool of public entry nodes, is ``GATEWAY``)."""
HTTP_ROUTE = BuiltinKind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
TLS_ROUTE = BuiltinKind("gateway.networking.k8s.io", "v1", "tlsroutes", "TLSRoute")
GRPC_ROUTE = BuiltinKind("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute")
TCP_ROUTE = BuiltinKind("gateway.networking.k8s.io", "v1", "tcproutes", "TCPRoute")
UDP_ROUTE = BuiltinKind("gateway.networking.k8s.io", "v1", "udproutes", "UDPRoute")
REFERENCE_GRANT = BuiltinKind("gateway.networking.k8s.io", "v1beta1", "referencegrants",
                              "ReferenceGrant")  # fmt: skip
GATEWAY_API_KINDS = (
    GATEWAY_CLASS, ROUTED_GATEWAY, HTTP_ROUTE, TLS_ROUTE, GRPC_ROUTE, TCP_ROUTE, UDP_ROUTE,
    REFERENCE_GRANT,
)  # fmt: skip
AnyKind = ResourceKind | BuiltinKind


class SecretNotOwned(Exception):
    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(
            f"Secret {namespace}/{name} exists and was not made by the operator for this "
            "Certificate: it is left untouched; delete it or choose another secretName"
        )


class KubeApi(Protocol):
    async def apply_daemonset(self, manifest: dict[str, Any]) -> str:
        """Create or replace a DaemonSet; its uid."""

    async def apply_service_account(self, manifest: dict[str, Any]) -> None: ...

    async def review_token(self, token: str, audience: str) -> ReviewedToken: ...

    async def pod_facts(self, namespace: str, name: str) -> PodFacts | None: ...

    async def node(self, name: str) -> tuple[dict[str, str], dict[str, str]] | None:
        """A Node's addresses by type and its labels."""

    async def namespace_labels(self) -> dict[str, dict[str, str]]: ...

    async def post_event(
        self,
        kind: AnyKind,
        namespace: str,
        name: str,
        uid: str,
        warning: bool,
        reason: str,
        message: str,
    ) -> None: ...

    async def announce(
        self, kind: AnyKind, body: Mapping[str, Any], warning: bool, reason: str, message: str
    ) -> None:
        """An Event on ``body``; never fails."""

    async def live_pods(self, namespace: str, label_selector: str) -> list[str]: ...

    async def read_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> dict[str, str] | None: ...

    async def stored_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> StoredSecret | None: ...

    def forget_secret(self, namespace: str, name: str) -> None: ...

    async def create_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        owner: Mapping[str, Any] | None,
        labels: Mapping[str, str],
        kind: str = "Opaque",
    ) -> bool:
        """False when it exists already."""

    async def put_tls_secret(
        self,
        namespace: str,
        name: str,
        chain: str,
        key: str,
        owner: Mapping[str, Any],
        labels: Mapping[str, str],
    ) -> None:
        """Raises :class:`SecretNotOwned` for a Secret of that name that ``owner`` does not own."""

    async def write_secret(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None: ...

    async def delete_secret(
        self, namespace: str, name: str, *, owner_uid: str | None = None
    ) -> None: ...

    async def get_object(
        self, kind: ResourceKind, namespace: str, name: str
    ) -> dict[str, Any] | None: ...

    async def create_object(
        self, kind: ResourceKind, namespace: str, body: dict[str, Any]
    ) -> None: ...

    async def patch_object(
        self, kind: ResourceKind, namespace: str, name: str, patch: dict[str, Any]
    ) -> None: ...

    async def delete_object(self, kind: ResourceKind, namespace: str, name: str) -> None:
        """Delete it (already gone is fine)."""

    async def patch_status(
        self, kind: ResourceKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        """Merge ``status`` into the object's; False when the object is gone."""

    async def list_objects(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]: ...

    def pages(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def list_builtin(
        self, kind: BuiltinKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Every object of ``kind`` in ``namespaces`` (all when empty)."""

    async def patch_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        """Merge ``status`` into the object's; False when the object is gone."""

    async def edit_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str,
        edit: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any] | None:  # fmt: skip
        """Replace the status with ``edit(status as stored)``, guarded by the object's
        resourceVersion (read again on a conflict): for a status other controllers write parts
        of. The status written; None when the object is gone."""

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...

    async def write_config_map(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None:
        """Create the ConfigMap, or replace its data."""
