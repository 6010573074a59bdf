"""What the cluster says that routes depend on (Ingresses, IngressClasses, the Gateway API's
GatewayClasses, Gateways, HTTPRoutes and ReferenceGrants, namespaces' labels, Services,
EndpointSlices, and the addresses of pods, Services and nodes), as the watches last told it, and
the one decision that follows: each Ingress's claims, problems and Certificates, the Gateway
API's (:mod:`kakuremichi.control.gateway_api`), and each backend's endpoints. Pure: the
operator's watches feed it (:mod:`kakuremichi.control.ingresses`) and project its decision into
the state and the cluster.

Bodies are kept trimmed to what routing reads, and every ``saw_…`` says whether anything that
routing reads changed, so that the churn of a busy cluster (pod status, Service annotations)
costs no decision.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kakuremichi.api.resources import CertificateSpec
from kakuremichi.control import gateway_api
from kakuremichi.control.gateway_api import (
    GATEWAY_CONTROLLER,
    GatewayApiDecision,
    GatewayApiObjects,
)
from kakuremichi.control.ingress_routes import (
    DEFAULT_CLASS_ANNOTATION,
    INGRESS_CONTROLLER,
    BackendRef,
    ServiceFacts,
    backends_of,
    host_claims,
    ingress_routes,
    is_ours,
)
from kakuremichi.control.ownership import TunnelFacts
from kakuremichi.control.route_endpoints import (
    SERVICE_NAME_LABEL,
    AddressBook,
    Network,
    ready_endpoints,
)

Key = tuple[str, str]
"""(namespace, name)."""

MAX_HOSTS_PER_INGRESS = 100
"""Hosts beyond these are not served (each is a claim, a Certificate and a stored date)."""
ADMIN_NAMESPACES = ("kube-system",)
"""Namespaces whose EndpointSlices' addresses no other namespace's route may use (besides the
operator's own and the API server's ``default/kubernetes``)."""


@dataclass(frozen=True)
class IngressDecision:
    """What one Ingress of ours gets."""

    namespace: str
    name: str
    uid: str
    claims: tuple[TunnelFacts, ...]
    """One per host that has something to serve."""
    problems: tuple[str, ...]
    """One sentence per field that cannot be served."""
    certificates: Mapping[str, CertificateSpec]
    """Certificate name → its spec, one per claimed host."""

    @property
    def source(self) -> str:
        return source_of(self.namespace, self.name)


def source_of(namespace: str, name: str) -> str:
    """How the state names an Ingress's set of claims."""
    return f"Ingress {namespace}/{name}"


@dataclass(frozen=True)
class RouteDecision:
    ingresses: Mapping[Key, IngressDecision] = field(default_factory=dict)
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Backend stream (``namespace/service:port``) → its usable ready endpoints."""
    gateway_api: GatewayApiDecision = field(default_factory=GatewayApiDecision)

    def claims(self) -> dict[uuid.UUID, TunnelFacts]:
        found = {c.id: c for d in self.ingresses.values() for c in d.claims}
        found.update({c.id: c for cs in self.gateway_api.claims.values() for c in cs})
        return found

    def claim_sets(self) -> dict[str, tuple[TunnelFacts, ...]]:
        """Source → its claims, for every source of routes."""
        sets = {d.source: d.claims for d in self.ingresses.values()}
        sets.update(self.gateway_api.claims)
        return sets


@dataclass
class RouteSources:
    """An endpoint is used when it is the address of a pod of the route's own namespace, or lies
    in ``allowed`` (ranges the administrator opens to hand-written EndpointSlices, e.g. servers
    outside the cluster) and belongs to nothing of another namespace's: anything else (a node's
    services, the cloud's, another network's hosts) is out of reach by default."""

    cluster_agent: Key
    system_namespace: str
    allowed: tuple[Network, ...] = ()
    ingresses: dict[Key, dict[str, Any]] = field(default_factory=dict)
    classes: dict[str, bool] = field(default_factory=dict)
    """Our IngressClasses (controller ``kakuremichi.io/ingress-controller``) → default or not."""
    services: dict[Key, ServiceFacts] = field(default_factory=dict)
    service_ips: dict[Key, tuple[str, ...]] = field(default_factory=dict)
    """Cluster IPs, which the API server allocates (kube-proxy forwards them to that Service's
    pods, whatever namespace they are in)."""
    external_ips: dict[Key, tuple[str, ...]] = field(default_factory=dict)
    """``spec.externalIPs``, which a Service's namespace chooses (foreign to other namespaces;
    never stronger than a namespace's own pods)."""
    slices: dict[Key, dict[str, Any]] = field(default_factory=dict)
    pod_ips: dict[Key, tuple[str, ...]] = field(default_factory=dict)
    node_ips: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gateway_classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """GatewayClasses of our controller."""
    gateways: dict[Key, dict[str, Any]] = field(default_factory=dict)
    routes: dict[str, dict[Key, dict[str, Any]]] = field(default_factory=dict)
    """Route kind (``HTTPRoute``, ``TCPRoute``…) → its objects."""
    grants: dict[Key, dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)

    def copy(self) -> RouteSources:
        """A copy a decision can read while the watches change this one (bodies are replaced,
        never changed in place: shallow copies of the tables suffice)."""
        copied = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(copied, name, dict(value))
        copied.routes = {kind: dict(objects) for kind, objects in self.routes.items()}
        return copied

    # --- facts in -------------------------------------------------------------------------

    def saw_ingress(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        annotations = _map(meta.get("annotations"))
        trimmed = {
            "metadata": {
                "namespace": meta.get("namespace") or "", "name": meta.get("name") or "",
                "uid": meta.get("uid") or "", "generation": meta.get("generation"),
                "annotations": {k: v for k, v in annotations.items()
                                if k == "kubernetes.io/ingress.class"},
            },
            "spec": _map(body.get("spec")),
        }  # fmt: skip
        return _put(self.ingresses, _key(meta), trimmed)

    def ingress_gone(self, namespace: str, name: str) -> bool:
        return self.ingresses.pop((namespace, name), None) is not None

    def saw_class(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        name = str(meta.get("name") or "")
        if _map(body.get("spec")).get("controller") != INGRESS_CONTROLLER:
            return self.class_gone(name)
        default = _map(meta.get("annotations")).get(DEFAULT_CLASS_ANNOTATION) == "true"
        return _put(self.classes, name, default)

    def class_gone(self, name: str) -> bool:
        return self.classes.pop(name, None) is not None

    def saw_service(self, body: Mapping[str, Any]) -> bool:
        meta, spec = _map(body.get("metadata")), _map(body.get("spec"))
        allocated = [spec.get("clusterIP"), *_texts(spec.get("clusterIPs"))]
        addresses = tuple(sorted({str(ip) for ip in allocated if ip and ip != "None"}))
        changed = _put(self.service_ips, _key(meta), addresses)
        chosen = tuple(sorted(set(_texts(spec.get("externalIPs")))))
        changed = _put(self.external_ips, _key(meta), chosen) or changed
        return _put(self.services, _key(meta), ServiceFacts.of(body)) or changed

    def service_gone(self, namespace: str, name: str) -> bool:
        self.service_ips.pop((namespace, name), None)
        self.external_ips.pop((namespace, name), None)
        return self.services.pop((namespace, name), None) is not None

    def saw_slice(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        trimmed = {
            "metadata": {
                "namespace": meta.get("namespace") or "",
                "labels": {SERVICE_NAME_LABEL: _map(meta.get("labels")).get(SERVICE_NAME_LABEL)},
            },
            "addressType": body.get("addressType"),
            "ports": body.get("ports"),
            "endpoints": body.get("endpoints"),
        }
        return _put(self.slices, _key(meta), trimmed)

    def slice_gone(self, namespace: str, name: str) -> bool:
        return self.slices.pop((namespace, name), None) is not None

    def saw_pod(self, body: Mapping[str, Any]) -> bool:
        status = _map(body.get("status"))
        ips = {str(p.get("ip")) for p in _list(status.get("podIPs")) if isinstance(p, Mapping)}
        if status.get("podIP"):
            ips.add(str(status["podIP"]))
        if _map(body.get("spec")).get("hostNetwork"):
            ips.clear()  # (a node's address: foreign to every route anyway)
        return _put(self.pod_ips, _key(_map(body.get("metadata"))), tuple(sorted(ips)))

    def pod_gone(self, namespace: str, name: str) -> bool:
        return self.pod_ips.pop((namespace, name), None) is not None

    def saw_node(self, body: Mapping[str, Any]) -> bool:
        addresses = _list(_map(body.get("status")).get("addresses"))
        ips = tuple(sorted({
            str(a.get("address")) for a in addresses
            if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP")
        }))  # fmt: skip
        return _put(self.node_ips, str(_map(body.get("metadata")).get("name") or ""), ips)

    def node_gone(self, name: str) -> bool:
        return self.node_ips.pop(name, None) is not None

    def saw_gateway_class(self, body: Mapping[str, Any]) -> bool:
        meta, spec = _map(body.get("metadata")), _map(body.get("spec"))
        name = str(meta.get("name") or "")
        if spec.get("controllerName") != GATEWAY_CONTROLLER:
            return self.gateway_class_gone(name)
        return _put(self.gateway_classes, name, {"metadata": _trim(meta), "spec": spec})

    def gateway_class_gone(self, name: str) -> bool:
        return self.gateway_classes.pop(name, None) is not None

    def saw_gateway(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        trimmed = {"metadata": _trim(meta), "spec": _map(body.get("spec"))}
        return _put(self.gateways, _key(meta), trimmed)

    def gateway_gone(self, namespace: str, name: str) -> bool:
        return self.gateways.pop((namespace, name), None) is not None

    def saw_route(self, kind: str, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        trimmed = {"metadata": _trim(meta), "spec": _map(body.get("spec"))}
        return _put(self.routes.setdefault(kind, {}), _key(meta), trimmed)

    def route_gone(self, kind: str, namespace: str, name: str) -> bool:
        return self.routes.get(kind, {}).pop((namespace, name), None) is not None

    def saw_grant(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        return _put(self.grants, _key(meta), {"spec": _map(body.get("spec"))})

    def grant_gone(self, namespace: str, name: str) -> bool:
        return self.grants.pop((namespace, name), None) is not None

    def saw_namespace(self, body: Mapping[str, Any]) -> bool:
        meta = _map(body.get("metadata"))
        labels = {str(k): str(v) for k, v in _map(meta.get("labels")).items()}
        return _put(self.namespaces, str(meta.get("name") or ""), labels)

    def namespace_gone(self, name: str) -> bool:
        return self.namespaces.pop(name, None) is not None

    # --- the decision ---------------------------------------------------------------------

    def decide(self, seen: Mapping[uuid.UUID, datetime], now: datetime) -> RouteDecision:
        """Each Ingress of ours: its hosts' claims (dated by ``seen``, else ``now``), problems
        and Certificates; and the endpoints of every backend one of them leads to."""
        default = any(self.classes.values())
        by_namespace: dict[str, dict[str, ServiceFacts]] = {}
        for (namespace, name), facts in self.services.items():
            by_namespace.setdefault(namespace, {})[name] = facts
        decided: dict[Key, IngressDecision] = {}
        refs: set[BackendRef] = set()
        for key, body in sorted(self.ingresses.items()):
            try:
                if not is_ours(body, default, self.classes):
                    continue
                decided[key], leads_to = self._decide_ingress(key, body, by_namespace, seen, now)
            except Exception as error:  # (one odd object never costs the others their routes)
                problem = f"the Ingress could not be read: {type(error).__name__}"
                uid = str(body["metadata"]["uid"])
                decided[key] = IngressDecision(key[0], key[1], uid, (), (problem,), {})
                continue
            refs |= leads_to
        objects = GatewayApiObjects(
            classes=self.gateway_classes, gateways=self.gateways, routes=self.routes,
            grants=self.grants, namespaces=self.namespaces,
        )  # fmt: skip
        routed = gateway_api.decide(objects, by_namespace, self.cluster_agent, seen, now)
        refs |= routed.backends
        return RouteDecision(decided, self._endpoints(refs), routed)

    def _decide_ingress(
        self, key: Key, body: Mapping[str, Any],
        by_namespace: Mapping[str, dict[str, ServiceFacts]],
        seen: Mapping[uuid.UUID, datetime], now: datetime,
    ) -> tuple[IngressDecision, set[BackendRef]]:  # fmt: skip
        routes = ingress_routes(body, by_namespace.get(key[0], {}))
        problems = list(routes.problems)
        if len(routes.hosts) > MAX_HOSTS_PER_INGRESS:
            for extra in sorted(routes.hosts)[MAX_HOSTS_PER_INGRESS:]:
                del routes.hosts[extra]
            problems.append(
                f"spec.rules: an Ingress serves at most {MAX_HOSTS_PER_INGRESS} hosts; those "
                "after the first (in name order) are not served."
            )
        claims = host_claims(body, routes, self.cluster_agent, seen, now)
        certificates = {}
        for claim in claims:
            secret = routes.hosts[claim.domain].tls_secret
            certificates[claim.certificate] = CertificateSpec(
                domain=claim.domain,
                secret_name=secret or f"{claim.certificate}-tls",
                issuer="Secret" if secret else "ACME",
            )
        uid = str(body["metadata"]["uid"])
        decided = IngressDecision(key[0], key[1], uid, claims, tuple(problems), certificates)
        return decided, backends_of([routes])

    def _endpoints(self, refs: set[BackendRef]) -> dict[str, tuple[str, ...]]:
        slices: dict[Key, list[dict[str, Any]]] = {}
        for (namespace, _), piece in self.slices.items():
            service = piece["metadata"]["labels"].get(SERVICE_NAME_LABEL)
            if isinstance(service, str):
                slices.setdefault((namespace, service), []).append(piece)
        book = self._address_book()
        endpoints: dict[str, tuple[str, ...]] = {}
        for ref in sorted(refs):
            try:
                found = ready_endpoints(
                    ref, slices.get((ref.namespace, ref.service), ()), allowed=self.allowed,
                    book=book,
                )  # fmt: skip
            except Exception:  # (an odd slice costs its own Service its endpoints, no more)
                found = []
            endpoints[ref.stream] = tuple(found)
        return endpoints

    def _address_book(self) -> AddressBook:
        """Whose each address is: a namespace's pods (its own, foreign to the others), the
        ``externalIPs`` a namespace chose and the addresses the cluster's own services and the
        operator's namespace stand behind (the API server's address is in no pod, but in
        ``default/kubernetes``'s EndpointSlice), foreign to the others; cluster IPs and nodes,
        foreign to all."""
        book = AddressBook()
        for (namespace, _), ips in self.pod_ips.items():
            book.add_pods(namespace, ips)
        for (namespace, _), ips in self.external_ips.items():
            book.add_chosen(namespace, ips)
        for ips in self.service_ips.values():
            book.add_shared(ips)
        for ips in self.node_ips.values():
            book.add_shared(ips)
        admin = {*ADMIN_NAMESPACES, self.system_namespace}
        for (namespace, _), piece in self.slices.items():
            service = piece["metadata"]["labels"].get(SERVICE_NAME_LABEL)
            if not (namespace in admin or (namespace, service) == ("default", "kubernetes")):
                continue
            for endpoint in _list(piece.get("endpoints")):
                if isinstance(endpoint, Mapping):
                    book.add_chosen(namespace, _texts(endpoint.get("addresses")))
        return book


def _trim(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What routing reads of an object's metadata."""
    return {
        k: meta.get(k)
        for k in ("namespace", "name", "uid", "generation", "creationTimestamp")
        if meta.get(k) is not None
    }


def _key(meta: Mapping[str, Any]) -> Key:
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _texts(value: object) -> list[str]:
    return [v for v in _list(value) if isinstance(v, str)]


def _put(table: dict[Any, Any], key: object, value: object) -> bool:
    if key in table and table[key] == value:
        return False
    table[key] = value
    return True
