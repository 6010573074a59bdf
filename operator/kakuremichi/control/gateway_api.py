"""What Gateway API objects of class ``kakuremichi`` ask for, and what they get: pure, as
:mod:`kakuremichi.control.ingress_routes` is for Ingresses (issue 21).

From GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes, TLSRoutes, TCPRoutes, UDPRoutes,
ReferenceGrants, namespace labels and Services comes one decision:

- each GatewayClass of our controller (``kakuremichi.io/gateway-controller``) is accepted, or
  not, with the reason;
- each Gateway of such a class: its conditions, its listeners' (HTTP on port 80, HTTPS and TLS
  passthrough on 443: the ports the gateways listen on; TCP and UDP on any other), the pool
  whose addresses it gets, and a Certificate per HTTP host served through it (a listener's
  ``certificateRefs``, or ACME with the listener TLS option ``kakuremichi.io/issuer: ACME`` and
  for hosts attached to HTTP listeners only); a host attaches through its most specific
  listener only;
- each route attached to such a Gateway: a status per parent of ours (``Accepted``,
  ``ResolvedRefs``, ``PartiallyInvalid``, with the spec's reasons), its problems in sentences;
- one claim per kind, namespace and host (TCPRoutes, UDPRoutes: per listener port): for
  HTTPRoutes, the rules of every HTTPRoute of that namespace attached with that host, ordered as
  the Gateway API orders matches (Exact path, then the longest prefix, then method, then the
  most header and query matches, then the oldest route, then its name, then rule order); for
  GRPCRoutes likewise (the longest service, then method, then the most headers), each call
  routed at the gateway, or the HTTP/2 connections passed whole when every call goes to one
  backend unchanged; for TLSRoutes, TCPRoutes and UDPRoutes, the oldest route's backends by
  weight, passed through. Claims weigh in the one ownership decision against Tunnels, Ingresses
  and other namespaces' routes: routes of one namespace merge on a host, routes of two
  namespaces never do (the oldest claim holds, as for every domain and port).

Backends are Services of the route's namespace, or of another whose ReferenceGrant allows it.
Nothing any of these objects says raises here: the API server's schema is not this module's
guarantee.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kakuremichi.api.protocol import (
    HeaderEdits,
    HeaderMatch,
    HeaderPair,
    PathMatch,
    QueryMatch,
    RequestMatch,
    RequestRule,
    WeightedBackend,
)
from kakuremichi.api.resources import CertificateSpec, PortProtocol
from kakuremichi.control.ingress_routes import BackendRef, ServiceFacts, is_domain
from kakuremichi.control.ownership import PORT_DOMAIN_SUFFIX, TunnelFacts

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"
GATEWAY_CONTROLLER = "kakuremichi.io/gateway-controller"
POOL_GROUP = "kakuremichi.io"
ISSUER_OPTION = "kakuremichi.io/issuer"
"""Listener ``tls.options`` key: ``ACME`` has the hosts' certificates issued by ACME."""
HTTP_PORT, HTTPS_PORT = 80, 443
HTTP_ROUTE, GRPC_ROUTE, TLS_ROUTE = "HTTPRoute", "GRPCRoute", "TLSRoute"
TCP_ROUTE, UDP_ROUTE = "TCPRoute", "UDPRoute"
ALL_ROUTE_KINDS = (HTTP_ROUTE, TLS_ROUTE, GRPC_ROUTE, TCP_ROUTE, UDP_ROUTE)
"""In the order they are decided (and claim hosts and ports)."""
PORT_ROUTE_KINDS: Mapping[str, PortProtocol] = {TCP_ROUTE: "TCP", UDP_ROUTE: "UDP"}
"""Routes that claim a public port of their listener, not a host."""
ROUTE_KINDS = {
    "HTTP": (HTTP_ROUTE, GRPC_ROUTE), "HTTPS": (HTTP_ROUTE, GRPC_ROUTE), "TLS": (TLS_ROUTE,),
    "TCP": (TCP_ROUTE,), "UDP": (UDP_ROUTE,),
}  # fmt: skip
"""What each listener protocol served takes (TLS: passed through, by SNI, on 443; TCP, UDP:
forwarded from the listener's port, which the gateways open when a Gateway pool allows it)."""
MAX_RULES_PER_HOST = 1000
"""What a gateway takes for one host."""
MAX_HOSTS_PER_NAMESPACE = 500
PASSTHROUGH_TARGET = "127.0.0.1:1"
"""A TLSRoute host's ``target``: nothing listens there, and it is no name to resolve. The
cluster agent sends the host's connections to its backend's endpoints; an agent of an earlier
release, which does not read ``backend``, is refused there instead of dialling a Service's
cluster IP (whose EndpointSlices a tenant writes by hand)."""
MAX_SHARES = 16
"""Backends of a TLSRoute's, TCPRoute's or UDPRoute's rule (the CRD's own bound)."""
MAX_ATTACHMENTS_PER_ROUTE = 100
"""(listener, host) pairs of one route: parentRefs by listeners by hostnames could be 32,768."""
_TOO_MANY_ATTACHMENTS = (
    f"spec: a route attaches at most {MAX_ATTACHMENTS_PER_ROUTE} times (listeners by hostnames, "
    "over all its parentRefs); the rest is not served."
)
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

Key = tuple[str, str]
CertificateSource = tuple[str, str, str]
"""("Secret", its name, its namespace) or ("ACME", "", "")."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class ListenerDecision:
    name: str
    accepted: bool
    supported_kinds: tuple[str, ...]
    attached: int
    conditions: tuple[Condition, ...]
    """Accepted, ResolvedRefs, Conflicted (Programmed follows from the Gateway's addresses)."""


@dataclass(frozen=True)
class GatewayDecision:
    namespace: str
    name: str
    uid: str
    generation: int
    accepted: bool
    pool: str | None
    """The kakuremichi Gateway pool whose addresses it gets (None: every pool's)."""
    conditions: tuple[Condition, ...]
    listeners: tuple[ListenerDecision, ...]
    certificates: Mapping[Key, CertificateSpec]
    """(namespace, name) of a Certificate → its spec, one per claim served through it: in the
    Gateway's namespace, or in that of the Secret a ReferenceGrant lets it use."""


@dataclass(frozen=True)
class ParentDecision:
    ref: Mapping[str, Any]
    """The parentRef, as the route gave it (status echoes it)."""
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class RouteDecision:
    namespace: str
    name: str
    uid: str
    generation: int
    parents: tuple[ParentDecision, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class ClassDecision:
    name: str
    generation: int
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class GatewayApiDecision:
    classes: Mapping[str, ClassDecision] = field(default_factory=dict)
    gateways: Mapping[Key, GatewayDecision] = field(default_factory=dict)
    routes: Mapping[str, Mapping[Key, RouteDecision]] = field(default_factory=dict)
    """Kind → the routes of that kind attached to a Gateway of ours."""
    claims: Mapping[str, tuple[TunnelFacts, ...]] = field(default_factory=dict)
    """Source (``HTTPRoutes <namespace>``, ``TCPRoutes <namespace>``) → its claims."""
    backends: frozenset[BackendRef] = frozenset()


@dataclass(frozen=True)
class GatewayApiObjects:
    """The objects as the watches last told them (bodies, by key)."""

    classes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gateways: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    routes: Mapping[str, Mapping[Key, Mapping[str, Any]]] = field(default_factory=dict)
    """Kind (``HTTPRoute``…) → its objects."""
    grants: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Namespace → its labels (for ``allowedRoutes.namespaces.selector``)."""


def source_of(namespace: str, kind: str = HTTP_ROUTE) -> str:
    return f"{kind}s {namespace}"


def certificate_name(gateway: Key, host: str, namespace: str, kind: str = HTTP_ROUTE) -> str:
    """A Certificate of a Gateway (``(namespace, name)``) for the claim of routes of ``kind``
    and ``namespace`` on a host; never an Ingress's name."""
    said = f"gateway:{gateway[0]}/{gateway[1]}/{host}/{namespace}"
    if kind != HTTP_ROUTE:
        said += f"/{kind}"
    digest = hashlib.sha256(said.encode()).hexdigest()[:16]
    return f"{gateway[1][:40].rstrip('-.')}-{digest}"


def claim_id(namespace: str, host: str, kind: str = HTTP_ROUTE) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"kakuremichi:{kind.lower()}s:{namespace}/{host}")


# --- the decision ---------------------------------------------------------------------------


def decide(
    objects: GatewayApiObjects, services: Mapping[str, Mapping[str, ServiceFacts]],
    cluster_agent: Key, seen: Mapping[uuid.UUID, datetime], now: datetime,
) -> GatewayApiDecision:  # fmt: skip
    """``services``: namespace → name → facts; ``seen``: when each claim was first seen."""
    classes = {name: _class(name, body) for name, body in sorted(objects.classes.items())}
    accepted_classes = {n for n, c in classes.items() if c.conditions[0].status}
    grants = _grants_by_namespace(objects.grants)
    listeners: dict[Key, list[_Listener]] = {}
    gateway_facts: dict[Key, tuple[Mapping[str, Any], list[Condition], str | None, bool]] = {}
    for key, body in sorted(objects.gateways.items()):
        spec = _map(body.get("spec"))
        class_name = spec.get("gatewayClassName")
        if not isinstance(class_name, str) or class_name not in classes:
            continue
        try:
            conditions, pool, ok = _gateway(body, objects.classes[class_name],
                                            class_name in accepted_classes)  # fmt: skip
            listeners[key] = _listeners(key, spec, grants) if ok else []
        except Exception as error:  # (one odd object never costs the others their routes)
            conditions = [Condition("Accepted", False, "Invalid", "The Gateway could not be "
                                    f"read: {type(error).__name__}.")]  # fmt: skip
            pool, ok, listeners[key] = None, False, []
        gateway_facts[key] = (body, conditions, pool, ok)

    decided_routes: dict[str, dict[Key, RouteDecision]] = {kind: {} for kind in ALL_ROUTE_KINDS}
    attachments: list[_Attached] = []
    best: Best = {}
    for kind in ALL_ROUTE_KINDS:
        bodies = objects.routes.get(kind, {})
        for key, body in sorted(bodies.items(), key=lambda kv: _age(kv[1], kv[0])):
            try:
                decided, attached = _route(kind, key, body, gateway_facts, listeners, objects,
                                           grants, services, best)  # fmt: skip
            except Exception as error:  # (one odd object never costs the others their routes)
                meta = _map(body.get("metadata"))
                problem = f"the {kind} could not be read: {type(error).__name__}"
                uid = str(meta.get("uid", ""))
                decided, attached = RouteDecision(key[0], key[1], uid, 0, (), (problem,)), []
            if decided.parents:
                decided_routes[kind][key] = decided
                attachments.extend(attached)

    claims, certificates, backends, dropped = _claims(attachments, cluster_agent, seen, now)
    for (kind, *route), said in dropped.items():
        key = (route[0], route[1])
        decided = decided_routes[kind][key]
        problems = tuple(dict.fromkeys((*decided.problems, *said)))
        decided_routes[kind][key] = replace(decided, problems=problems)
    attached_routes: dict[tuple[Key, str], set[tuple[str, str, str]]] = {}
    for one in attachments:
        attached_routes.setdefault((one.gateway, one.listener), set()).add((one.kind, *one.route))
    gateways = {}
    for key, (body, conditions, pool, ok) in gateway_facts.items():
        meta = _map(body.get("metadata"))
        counted = [
            ListenerDecision(
                listener.name,
                listener.accepted,
                listener.kinds,
                len(attached_routes.get((key, listener.name), ())),
                tuple(listener.conditions),
            )
            for listener in listeners[key]
        ]
        gateways[key] = GatewayDecision(
            key[0], key[1], str(meta.get("uid", "")), _generation(meta), ok, pool,
            tuple(conditions), tuple(counted), certificates.get(key, {}),
        )  # fmt: skip
    return GatewayApiDecision(classes, gateways, decided_routes, claims, frozenset(backends))


def _class(name: str, body: Mapping[str, Any]) -> ClassDecision:
    spec = _map(body.get("spec"))
    generation = _generation(_map(body.get("metadata")))
    ref = spec.get("parametersRef")
    if ref is not None:
        ref = _map(ref)
        if ref.get("group") != POOL_GROUP or ref.get("kind") != "Gateway":
            return ClassDecision(name, generation, (Condition(
                "Accepted", False, "InvalidParameters",
                "spec.parametersRef: must name a kakuremichi Gateway pool (group "
                "kakuremichi.io, kind Gateway).",
            ),))  # fmt: skip
    return ClassDecision(name, generation, (
        Condition("Accepted", True, "Accepted", "kakuremichi serves Gateways of this class."),
    ))  # fmt: skip


def _gateway(
    body: Mapping[str, Any], class_body: Mapping[str, Any], class_ok: bool
) -> tuple[list[Condition], str | None, bool]:
    """Its Accepted condition, the pool it is bound to, and whether it is accepted."""
    spec = _map(body.get("spec"))
    if not class_ok:
        return [Condition("Accepted", False, "InvalidParameters",
                          "spec.gatewayClassName: the GatewayClass is not accepted (its status "
                          "says why).")], None, False  # fmt: skip
    if _list(spec.get("addresses")):
        return [Condition("Accepted", False, "UnsupportedAddress",
                          "spec.addresses: a Gateway takes the addresses of its kakuremichi "
                          "Gateway pool; leave this field out.")], None, False  # fmt: skip
    pool = None
    # (the administrator's GatewayClass first: a Gateway chooses a pool only where it says none)
    for ref in (_map(_map(class_body.get("spec")).get("parametersRef")),
                _map(_map(spec.get("infrastructure")).get("parametersRef"))):  # fmt: skip
        if not ref:
            continue
        if ref.get("group") != POOL_GROUP or ref.get("kind") != "Gateway":
            return (
                [
                    Condition(
                        "Accepted",
                        False,
                        "InvalidParameters",
                        "spec.infrastructure.parametersRef: must name a kakuremichi "
                        "Gateway pool (group kakuremichi.io, kind Gateway).",
                    )
                ],
                None,
                False,
            )
        pool = _text(ref.get("name")) or None
        break
    return [Condition("Accepted", True, "Accepted", "Bound to " + (
        f"kakuremichi Gateway pool {pool}." if pool else "every kakuremichi Gateway pool."
    ))], pool, True  # fmt: skip


@dataclass
class _Listener:
    name: str
    protocol: str
    port: int
    hostname: str | None
    accepted: bool
    kinds: tuple[str, ...]
    namespaces: Mapping[str, Any]
    conditions: list[Condition]
    certificate: CertificateSource | None = None
    """For HTTPS; None for HTTP."""


def _listeners(key: Key, spec: Mapping[str, Any], grants: Grants
               ) -> list[_Listener]:  # fmt: skip
    out: list[_Listener] = []
    for i, item in enumerate(_list(spec.get("listeners"))):
        at = f"spec.listeners[{i}]"
        name, protocol, port = (
            _text(item.get("name")),
            _text(item.get("protocol")),
            item.get("port"),
        )
        hostname = _text(item.get("hostname")) or None
        allowed = _map(item.get("allowedRoutes"))
        conditions: list[Condition] = []
        accepted = True
        tls = _map(item.get("tls"))
        if protocol not in ROUTE_KINDS:
            accepted = False
            conditions.append(
                Condition(
                    "Accepted",
                    False,
                    "UnsupportedProtocol",
                    f"{at}.protocol: kakuremichi serves HTTP, HTTPS, TLS, TCP and UDP "
                    f"listeners; {protocol or 'this'} is not served yet.",
                )
            )
        elif protocol in ("TCP", "UDP"):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                accepted = False
                conditions.append(Condition("Accepted", False, "PortUnavailable",
                                            f"{at}.port: a port from 1 to 65535."))  # fmt: skip
            elif protocol == "TCP" and port in (HTTP_PORT, HTTPS_PORT):
                accepted = False
                conditions.append(Condition("Accepted", False, "PortUnavailable",
                                            f"{at}.port: the gateways take HTTP on {HTTP_PORT} "
                                            f"and HTTPS on {HTTPS_PORT}; a TCP listener needs "
                                            "another port."))  # fmt: skip
        elif protocol == "TLS" and tls.get("mode", "Terminate") != "Passthrough":
            accepted = False
            conditions.append(Condition("Accepted", False, "UnsupportedProtocol",
                                        f"{at}.tls.mode: TLS listeners pass TLS through "
                                        "(Passthrough); to terminate it, use an HTTPS "
                                        "listener."))  # fmt: skip
        elif port != (HTTP_PORT if protocol == "HTTP" else HTTPS_PORT):
            accepted = False
            wanted = HTTP_PORT if protocol == "HTTP" else HTTPS_PORT
            conditions.append(Condition("Accepted", False, "PortUnavailable",
                                        f"{at}.port: the gateways take {protocol} on port "
                                        f"{wanted}."))  # fmt: skip
        served_kinds = ROUTE_KINDS.get(protocol, (HTTP_ROUTE,))
        kinds, bad_kinds = _kinds(allowed, served_kinds)
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs", "All references resolved.")
        if bad_kinds:
            resolved = Condition("ResolvedRefs", False, "InvalidRouteKinds",
                                 f"{at}.allowedRoutes.kinds: only {served_kinds[0]} is served "
                                 f"here, not {', '.join(bad_kinds)}.")  # fmt: skip
        certificate = None
        if accepted and protocol == "HTTPS":
            certificate, refused = _listener_certificate(key, _map(item.get("tls")), at, grants)
            if refused is not None:
                resolved = refused
        if accepted:
            conditions.append(Condition("Accepted", True, "Accepted", "Listener accepted."))
        conditions.append(resolved)
        out.append(_Listener(
            name, protocol, port if isinstance(port, int) else 0, hostname,
            accepted and resolved.status, kinds if accepted else (),
            _map(allowed.get("namespaces")), conditions, certificate,
        ))  # fmt: skip
    # (a TCP or UDP listener takes its whole port: its hostname, if any, selects nothing)
    seen: dict[tuple[str, int, str | None], list[_Listener]] = {}
    for listener in out:
        if not listener.accepted:
            continue
        if listener.protocol in ("TCP", "UDP"):
            seen.setdefault((listener.protocol, listener.port, None), []).append(listener)
        else:
            seen.setdefault(("", listener.port, listener.hostname), []).append(listener)
    for (by_port, _, _), same in seen.items():
        for listener in same:
            conflicted = len(same) > 1
            reason = "ProtocolConflict" if by_port else "HostnameConflict"
            listener.conditions.append(Condition(
                "Conflicted", conflicted, reason if conflicted else "NoConflicts",
                ("Another listener has the same protocol and port." if by_port else
                 "Another listener has the same port and hostname.") if conflicted
                else "No conflicts.",
            ))  # fmt: skip
            listener.accepted = listener.accepted and not conflicted
    return out


def _kinds(
    allowed: Mapping[str, Any], served: tuple[str, ...]
) -> tuple[tuple[str, ...], list[str]]:
    given = allowed.get("kinds")
    if not isinstance(given, list) or not given:
        return served, []
    good, bad = [], []
    for kind in _list(given):
        group = kind.get("group", GROUP)
        name = _text(kind.get("kind"))
        if group == GROUP and name in served:
            good.append(name)
        else:
            bad.append(f"{group or 'core'}/{name}")
    return tuple(good), bad


def _listener_certificate(
    key: Key, tls: Mapping[str, Any], at: str, grants: Grants
) -> tuple[CertificateSource | None, Condition | None]:
    if tls.get("mode", "Terminate") != "Terminate":
        return None, Condition("ResolvedRefs", False, "InvalidCertificateRef",
                               f"{at}.tls.mode: HTTPS listeners terminate TLS here; TLS "
                               "passthrough comes with TLS listeners.")  # fmt: skip
    refs = _list(tls.get("certificateRefs"))
    if not refs:
        if _map(tls.get("options")).get(ISSUER_OPTION) == "ACME":
            return ("ACME", "", ""), None
        return None, Condition("ResolvedRefs", False, "InvalidCertificateRef",
                               f"{at}.tls: name a Secret in certificateRefs, or set the option "
                               f"{ISSUER_OPTION}: ACME.")  # fmt: skip
    ref = refs[0]
    if ref.get("group", "") not in ("", None) or ref.get("kind", "Secret") != "Secret":
        return None, Condition(
            "ResolvedRefs",
            False,
            "InvalidCertificateRef",
            f"{at}.tls.certificateRefs[0]: must be a Secret.",
        )
    name = _text(ref.get("name"))
    namespace = _text(ref.get("namespace")) or key[0]
    if namespace != key[0] and not _granted(
        grants, ("Gateway", key[0]), ("Secret", namespace, name)
    ):
        return None, Condition("ResolvedRefs", False, "RefNotPermitted",
                               f"{at}.tls.certificateRefs[0]: no ReferenceGrant in that "
                               "namespace allows this Gateway to use its Secret.")  # fmt: skip
    if not _SECRET_NAME.fullmatch(name) or not _SECRET_NAME.fullmatch(namespace):
        return None, Condition("ResolvedRefs", False, "InvalidCertificateRef",
                               f"{at}.tls.certificateRefs[0].name: name a Secret.")  # fmt: skip
    return ("Secret", name, namespace), None


Shares = tuple[tuple[str | None, int], ...]
"""(backend stream, weight) of a passed-through route's backends (None: refused)."""
Grants = Mapping[str, Sequence[Mapping[str, Any]]]
"""Namespace → the specs of its ReferenceGrants."""


def _grants_by_namespace(grants: Mapping[Key, Mapping[str, Any]]) -> dict[str, list[Any]]:
    by_namespace: dict[str, list[Any]] = {}
    for (namespace, _), body in sorted(grants.items()):
        by_namespace.setdefault(namespace, []).append(_map(body.get("spec")))
    return by_namespace


def _granted(grants: Grants, source: tuple[str, str], target: tuple[str, str, str]) -> bool:
    """Whether a ReferenceGrant in the target's namespace lets ``source`` (kind, namespace)
    refer to ``target`` (kind, namespace, name)."""
    kind, namespace = source
    to_kind, to_namespace, to_name = target
    to_group = "" if to_kind in ("Secret", "Service") else GROUP
    for spec in grants.get(to_namespace, ()):
        froms = any(
            f.get("group") == GROUP and f.get("kind") == kind and f.get("namespace") == namespace
            for f in _list(spec.get("from"))
        )
        tos = any(
            (t.get("group") or "") == to_group and t.get("kind") == to_kind
            and (not t.get("name") or t.get("name") == to_name)
            for t in _list(spec.get("to"))
        )  # fmt: skip
        if froms and tos:
            return True
    return False


# --- routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attached:
    """A route attached to a listener of a Gateway with a host, and what it brings there."""

    gateway: Key
    listener: str
    route: Key
    host: str
    rules: tuple[tuple[tuple[Any, ...], RequestRule], ...]
    backends: frozenset[BackendRef]
    created: str
    generation: int
    certificate: CertificateSource | None
    listener_hostname: str | None
    kind: str = HTTP_ROUTE
    shares: Shares = ()
    """A passed-through route's backends by weight."""


def _route(
    kind: str, key: Key, body: Mapping[str, Any],
    gateways: Mapping[Key, tuple[Mapping[str, Any], list[Condition], str | None, bool]],
    listeners: Mapping[Key, list[_Listener]], objects: GatewayApiObjects, grants: Grants,
    services: Mapping[str, Mapping[str, ServiceFacts]], best: Best,
) -> tuple[RouteDecision, list[_Attached]]:  # fmt: skip
    meta, spec = _map(body.get("metadata")), _map(body.get("spec"))
    namespace = key[0]
    problems: list[str] = []
    shares: Shares = ()
    rules: list[tuple[tuple[Any, ...], RequestRule]] = []
    partial: Condition | None = None
    if kind == TLS_ROUTE or kind in PORT_ROUTE_KINDS:
        shares, backends, resolved = _passed_rules(kind, key, spec, grants, services, problems)
    else:
        rules, backends, resolved, partial = _rules(key, spec, grants, services, problems, kind)
    route_hosts: list[str | None] = [*_list_text(spec.get("hostnames"))] or [None]
    parents: list[ParentDecision] = []
    attached: list[_Attached] = []
    for p, ref in enumerate(_list(spec.get("parentRefs"))):
        if ref.get("group", GROUP) != GROUP or ref.get("kind", "Gateway") != "Gateway":
            continue
        parent = (_text(ref.get("namespace")) or namespace, _text(ref.get("name")))
        if parent not in gateways:
            continue  # (not a Gateway of ours: its controller, if any, says)
        _, _, _, gateway_ok = gateways[parent]
        at = f"spec.parentRefs[{p}]"
        accepted = _attach(at, kind, key, ref, parent, gateway_ok, listeners.get(parent, []),
                           route_hosts, objects.namespaces, best)  # fmt: skip
        conditions: list[Condition] = []
        if isinstance(accepted, Condition):
            conditions.append(accepted)
        elif kind in PORT_ROUTE_KINDS:  # (a port of the listener, whatever its hostname)
            conditions.append(Condition("Accepted", True, "Accepted", "Route accepted."))
            for listener, _ in accepted:
                if len(attached) >= MAX_ATTACHMENTS_PER_ROUTE:  # (over all its parentRefs)
                    problems.append(_TOO_MANY_ATTACHMENTS)
                    break
                attached.append(_Attached(
                    parent, listener.name, key, str(listener.port), (), frozenset(backends),
                    _created(meta), _generation(meta), None, None, kind, shares,
                ))  # fmt: skip
        else:
            hosts = sorted({h for _, h in accepted if h is not None})
            named = {h for h in hosts if _named(h)}
            unnamed = [h for h in hosts if h not in named]
            for h in unnamed:
                problems.append(
                    f"spec.hostnames: {h} is not served (kakuremichi publishes "
                    "named hosts; a wildcard's certificate would need DNS-01)."
                )
            if not named:
                conditions.append(Condition("Accepted", False, "UnsupportedValue",
                                            f"{at}: no named host to serve; give "
                                            "spec.hostnames (or the listener a hostname).")
                                  )  # fmt: skip
            elif not rules and kind in (HTTP_ROUTE, GRPC_ROUTE):
                conditions.append(Condition("Accepted", False, "UnsupportedValue",
                                            "spec.rules: no rule can be served (see "
                                            "PartiallyInvalid and the Events)."))  # fmt: skip
            else:
                conditions.append(Condition("Accepted", True, "Accepted", "Route accepted."))
                for listener, host in accepted:
                    if host not in named:
                        continue
                    if len(attached) >= MAX_ATTACHMENTS_PER_ROUTE:
                        problems.append(_TOO_MANY_ATTACHMENTS)
                        break
                    attached.append(_Attached(
                        parent, listener.name, key, host, tuple(rules), frozenset(backends),
                        _created(meta), _generation(meta), listener.certificate,
                        listener.hostname, kind, shares,
                    ))  # fmt: skip
        conditions.append(resolved)
        if partial is not None:
            conditions.append(partial)
        parents.append(ParentDecision(dict(ref), tuple(conditions)))
    uid = str(meta.get("uid", ""))
    decided = RouteDecision(namespace, key[1], uid, _generation(meta), tuple(parents),
                            tuple(dict.fromkeys(problems)))  # fmt: skip
    return decided, attached


def _attach(
    at: str, kind: str, route: Key, ref: Mapping[str, Any], parent: Key, gateway_ok: bool,
    listeners: Sequence[_Listener], route_hosts: Sequence[str | None],
    namespaces: Mapping[str, Mapping[str, str]], best: Best,
) -> Condition | list[tuple[_Listener, str | None]]:  # fmt: skip
    """The (listener, host) pairs a parentRef attaches the route to, or why none. A route of a
    namespace that no listener allows learns nothing more of the Gateway (not its listeners,
    not whether it is accepted)."""
    open_to_it = any(
        _namespace_allowed(listener.namespaces, route[0], parent[0], namespaces)
        for listener in listeners
    ) or (not gateway_ok and route[0] == parent[0])  # fmt: skip
    if not open_to_it:
        return Condition("Accepted", False, "NotAllowedByListeners",
                         f"{at}: the Gateway takes no routes from this namespace.")  # fmt: skip
    if not gateway_ok:
        return Condition(
            "Accepted",
            False,
            "NoMatchingParent",
            f"{at}: Gateway {parent[1]} is not accepted (its status says why).",
        )
    section, port = ref.get("sectionName"), ref.get("port")
    candidates = [
        listener for listener in listeners
        if (section is None or listener.name == section) and (port is None or listener.port == port)
    ]  # fmt: skip
    if not candidates:
        return Condition("Accepted", False, "NoMatchingParent",
                         f"{at}: Gateway {parent[1]} has no listener that matches "
                         "sectionName and port.")  # fmt: skip
    allowed = [
        listener for listener in candidates
        if listener.accepted and kind in listener.kinds
        and _namespace_allowed(listener.namespaces, route[0], parent[0], namespaces)
    ]  # fmt: skip
    if not allowed:
        return Condition("Accepted", False, "NotAllowedByListeners",
                         f"{at}: no listener of Gateway {parent[1]} that it names accepts "
                         f"{kind}s from this namespace.")  # fmt: skip
    if kind in PORT_ROUTE_KINDS:
        return [(listener, None) for listener in allowed]
    pairs: list[tuple[_Listener, str | None]] = []
    for listener in allowed:
        for host in route_hosts:
            meet = _intersect(listener.hostname, host)
            if meet is not None and _most_specific(parent, listeners, listener, meet, best):
                pairs.append((listener, meet))
    if not pairs:
        return Condition("Accepted", False, "NoMatchingListenerHostname",
                         f"{at}: no hostname of this route fits a listener of Gateway "
                         f"{parent[1]}.")  # fmt: skip
    return pairs


Best = dict[tuple[Key, int, str], int]
"""(Gateway, port, host) → how specifically its most specific listener names the host (looked
at once per decision: routes times listeners times listeners would be quadratic)."""


def _most_specific(
    gateway: Key, listeners: Sequence[_Listener], listener: _Listener, host: str, best: Best
) -> bool:
    """Whether no other accepted listener on its port names ``host`` more specifically: a host
    belongs to its most specific listener (a wildcard listener open to every namespace cannot
    take a host that a listener of its own names)."""
    key = (gateway, listener.port, host)
    if key not in best:
        best[key] = min((
            _specificity(other.hostname, host) for other in listeners
            if other.accepted and other.port == listener.port
            and _intersect(other.hostname, host) == host
        ), default=_specificity(None, host))  # fmt: skip
    return _specificity(listener.hostname, host) <= best[key]


def _namespace_allowed(
    rule: Mapping[str, Any], route_namespace: str, gateway_namespace: str,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:  # fmt: skip
    origin = rule.get("from", "Same")
    if origin == "All":
        return True
    if origin == "Same":
        return route_namespace == gateway_namespace
    if origin == "Selector":
        labels = namespaces.get(route_namespace)
        return labels is not None and _selects(_map(rule.get("selector")), labels)
    return False


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for label, wanted in _map(selector.get("matchLabels")).items():
        if labels.get(label) != wanted:
            return False
    for expression in _list(selector.get("matchExpressions")):
        name, operator = _text(expression.get("key")), expression.get("operator")
        values = _list_text(expression.get("values"))
        if operator == "In" and labels.get(name) not in values:
            return False
        if operator == "NotIn" and labels.get(name) in values:
            return False
        if operator == "Exists" and name not in labels:
            return False
        if operator == "DoesNotExist" and name in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def _intersect(listener: str | None, route: str | None) -> str | None:
    """The hostname a route serves through a listener (None: they never meet); no hostname on
    either side matches anything, and ``*.example.com`` any name below example.com."""
    if listener is None or route is None:
        return route if listener is None else listener
    if listener == route:
        return route
    if listener.startswith("*.") and route.endswith(listener[1:]):
        return route
    if route.startswith("*.") and listener.endswith(route[1:]):
        return listener
    return None


def _rules(
    key: Key, spec: Mapping[str, Any], grants: Grants,
    services: Mapping[str, Mapping[str, ServiceFacts]], problems: list[str],
    kind: str = HTTP_ROUTE,
) -> tuple[list[tuple[tuple[Any, ...], RequestRule]], set[BackendRef], Condition,
           Condition | None]:  # fmt: skip
    """An HTTPRoute's or GRPCRoute's rules, one per match with its precedence (not counting the
    route's age and name), the backends they lead to, ResolvedRefs, and PartiallyInvalid (None:
    all valid). A GRPCRoute's match is on the call's path, ``/service/method``."""
    read_match = _grpc_match if kind == GRPC_ROUTE else _match
    out: list[tuple[tuple[Any, ...], RequestRule]] = []
    backends: set[BackendRef] = set()
    unresolved: list[tuple[str, str]] = []
    invalid = 0
    given = _list(spec.get("rules")) or [{}]
    for r, rule in enumerate(given):
        at = f"spec.rules[{r}]"
        try:
            edits, refused = _filters(_list(rule.get("filters")), f"{at}.filters")
            if refused:  # (its requests answered 500: never passed on unfiltered)
                problems.extend(refused)
                invalid += 1
            weighted, bad = _weighted(key, rule, at, grants, services, kind, problems,
                                      unresolved, backends)  # fmt: skip
            invalid += bad
            matches = _list(rule.get("matches")) or [{}]
            for m, match in enumerate(matches):
                made = read_match(match, f"{at}.matches[{m}]")
                if isinstance(made, str):
                    problems.append(made)
                    continue
                request, rank = made
                out.append(((*rank, r, m), RequestRule(
                    matches=[request], backends=[] if refused else weighted,
                    request_headers=edits,
                )))  # fmt: skip
        except (ValidationError, ValueError, TypeError):
            problems.append(f"{at}: a value here is out of range or malformed; the rule is not "
                            "served.")  # fmt: skip
            invalid += 1
    if unresolved:
        reason = unresolved[0][0]
        for _, sentence in unresolved:
            problems.append(sentence)
        resolved = Condition("ResolvedRefs", False, reason, "; ".join(s for _, s in unresolved))
    else:
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs", "All references resolved.")
    partial = None
    if invalid or len(out) < sum(len(_list(r.get("matches")) or [{}]) for r in given):
        partial = Condition("PartiallyInvalid", True, "UnsupportedValue",
                            "Some rules or matches are not served; the route's Events say "
                            "which and why.")  # fmt: skip
    return out, backends, resolved, partial


def _weight(ref: Mapping[str, Any]) -> int:
    """A backendRef's weight, as the protocol takes it (0 to 1,000,000; 1 when unsaid)."""
    weight = ref.get("weight", 1)
    weight = weight if isinstance(weight, int) and not isinstance(weight, bool) else 1
    return min(max(0, weight), 1_000_000)


def _weighted(
    key: Key, rule: Mapping[str, Any], at: str, grants: Grants,
    services: Mapping[str, Mapping[str, ServiceFacts]], kind: str, problems: list[str],
    unresolved: list[tuple[str, str]], backends: set[BackendRef],
) -> tuple[list[WeightedBackend], int]:  # fmt: skip
    """A rule's backendRefs with their weights, and how many are refused for a filter. What
    cannot be reached takes its share all the same, answered 500 (as the spec asks): never
    shifted onto the others."""
    weighted: list[WeightedBackend] = []
    invalid = 0
    for b, ref in enumerate(_list(rule.get("backendRefs"))):
        where = f"{at}.backendRefs[{b}]"
        weight = _weight(ref)
        found = _backend_ref(key, ref, where, grants, services, kind)
        if isinstance(found, tuple):
            unresolved.append(found)
            weighted.append(WeightedBackend(stream=None, weight=weight))
            continue
        if _list(ref.get("filters")):
            problems.append(f"{where}.filters: filters on a backend are not served (its "
                            "share is answered 500); put them on the rule.")  # fmt: skip
            invalid += 1
            weighted.append(WeightedBackend(stream=None, weight=weight))
            continue
        backends.add(found)
        weighted.append(WeightedBackend(stream=found.stream, weight=weight))
    return weighted, invalid


def _header_matches(match: Mapping[str, Any], at: str) -> list[HeaderMatch] | str:
    """A match's header conditions (``Exact`` only), or why they are not served."""
    headers = []
    for h, header in enumerate(_list(match.get("headers"))):
        if header.get("type", "Exact") != "Exact":
            return f"{at}.headers[{h}].type: only Exact header matches are served."
        headers.append(
            HeaderMatch(name=_text(header.get("name")), value=_text(header.get("value")))
        )
    return headers


def _grpc_match(match: Mapping[str, Any], at: str) -> tuple[RequestMatch, tuple[Any, ...]] | str:
    """A GRPCRoute match as a request match on the call's path and headers, and its
    precedence (smaller first), or why it is not served."""
    method = _map(match.get("method"))
    if method.get("type", "Exact") != "Exact":
        return f"{at}.method.type: only Exact method matches are served."
    service, name = _text(method.get("service")), _text(method.get("method"))
    if name and not service:
        return f"{at}.method: a method without its service is not served; name the service too."
    headers = _header_matches(match, at)
    if isinstance(headers, str):
        return headers
    path = None
    if service:
        path = (
            PathMatch(type="Exact", value=f"/{service}/{name}") if name
            else PathMatch(type="PathPrefix", value=f"/{service}")
        )  # fmt: skip
    try:
        request = RequestMatch(path=path, headers=headers or None)
    except ValidationError:
        return f"{at}: a value is out of range or malformed."
    return request, (-len(service), -len(name), -len(headers))


def _passed_rules(
    kind: str, key: Key, spec: Mapping[str, Any], grants: Grants,
    services: Mapping[str, Mapping[str, ServiceFacts]], problems: list[str],
) -> tuple[Shares, set[BackendRef], Condition]:  # fmt: skip
    """The one rule of a TLSRoute, TCPRoute or UDPRoute: the backends its connections (UDP:
    each client's flow) are spread over by weight, and ResolvedRefs. A backendRef that does not
    resolve keeps its share, refused (never shifted onto the others)."""
    backends: set[BackendRef] = set()
    unresolved: list[tuple[str, str]] = []
    shares: list[tuple[str | None, int]] = []
    refs = [r for rule in _list(spec.get("rules"))[:1] for r in _list(rule.get("backendRefs"))]
    for b, ref in enumerate(refs[:MAX_SHARES]):
        weight = _weight(ref)
        if weight == 0:
            continue
        at = f"spec.rules[0].backendRefs[{b}]"
        found = _backend_ref(key, ref, at, grants, services, kind)
        if isinstance(found, tuple):
            unresolved.append(found)
            shares.append((None, weight))
        else:
            backends.add(found)
            shares.append((found.stream, weight))
    problems.extend(sentence for _, sentence in unresolved)
    if unresolved:
        resolved = Condition("ResolvedRefs", False, unresolved[0][0],
                             "; ".join(s for _, s in unresolved))  # fmt: skip
    else:
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs", "All references resolved.")
    return tuple(shares), backends, resolved


def _filters(filters: Sequence[Mapping[str, Any]], at: str) -> tuple[HeaderEdits | None, list[str]]:
    edits: HeaderEdits | None = None
    refused = []
    for f, item in enumerate(filters):
        kind = item.get("type")
        if kind == "RequestHeaderModifier" and edits is None:
            modifier = _map(item.get("requestHeaderModifier"))
            edits = HeaderEdits(
                set=[HeaderPair(name=_text(h.get("name")), value=_text(h.get("value")))
                     for h in _list(modifier.get("set"))] or None,
                add=[HeaderPair(name=_text(h.get("name")), value=_text(h.get("value")))
                     for h in _list(modifier.get("add"))] or None,
                remove=_list_text(modifier.get("remove")) or None,
            )  # fmt: skip
        else:
            refused.append(f"{at}[{f}].type: {kind} is not served yet (RequestHeaderModifier "
                           "is); the rule is not served.")  # fmt: skip
    return edits, refused


def _backend_ref(
    route: Key, ref: Mapping[str, Any], at: str, grants: Grants,
    services: Mapping[str, Mapping[str, ServiceFacts]], kind: str = HTTP_ROUTE,
) -> BackendRef | tuple[str, str]:  # fmt: skip
    """The Service port, or (reason, sentence) why not (``kind``: the route's)."""
    if ref.get("group", "") not in ("", None) or ref.get("kind", "Service") != "Service":
        return "InvalidKind", f"{at}: only Service backends are served."
    name = _text(ref.get("name"))
    namespace = _text(ref.get("namespace")) or route[0]
    if namespace != route[0] and not _granted(grants, (kind, route[0]),
                                              ("Service", namespace, name)):  # fmt: skip
        return "RefNotPermitted", (
            f"{at}: a Service of another namespace needs a "
            "ReferenceGrant there that allows this route."
        )
    facts = services.get(namespace, {}).get(name)
    if facts is None or facts.external_name:
        return "BackendNotFound", f"{at}: there is no Service {name} to serve."
    port = ref.get("port")
    protocol = PORT_ROUTE_KINDS.get(kind, "TCP")
    for candidate in facts.ports:
        if candidate.port == port and candidate.protocol == protocol:
            return BackendRef(namespace, name, candidate.port, candidate.name, protocol)
    return "BackendNotFound", f"{at}.port: Service {name} has no {protocol} port {port}."


def _match(match: Mapping[str, Any], at: str) -> tuple[RequestMatch, tuple[Any, ...]] | str:
    """A match and its precedence (smaller first), or why it is not served."""
    path = _map(match.get("path"))
    kind = path.get("type", "PathPrefix")
    value = path.get("value", "/")
    if kind not in ("Exact", "PathPrefix"):
        return f"{at}.path.type: {kind} is not served (Exact and PathPrefix are)."
    if not isinstance(value, str):
        return f"{at}.path.value: must be an absolute path."
    headers = _header_matches(match, at)
    if isinstance(headers, str):
        return headers
    query = []
    for q, param in enumerate(_list(match.get("queryParams"))):
        if param.get("type", "Exact") != "Exact":
            return f"{at}.queryParams[{q}].type: only Exact query matches are served."
        query.append(QueryMatch(name=_text(param.get("name")), value=_text(param.get("value"))))
    method = match.get("method")
    try:
        request = RequestMatch(
            path=PathMatch(type=kind, value=value), method=method or None,
            headers=headers or None, query=query or None,
        )  # fmt: skip
    except ValidationError:
        return f"{at}: a value is out of range or malformed (paths without encoded slashes)."
    length = len(value.rstrip("/")) if kind == "PathPrefix" else len(value)
    rank = (kind != "Exact", -length, method is None, -len(headers), -len(query))
    return request, rank


def _claims(
    attachments: Sequence[_Attached], cluster_agent: Key, seen: Mapping[uuid.UUID, datetime],
    now: datetime,
) -> tuple[dict[str, tuple[TunnelFacts, ...]], dict[Key, dict[Key, CertificateSpec]],
           set[BackendRef], dict[tuple[str, str, str], list[str]]]:  # fmt: skip
    """One claim per kind of route, namespace and host: for HTTPRoutes, with the rules of its
    routes in precedence order, and a Certificate in the Gateway that gives its certificate
    (per claim: another namespace's claim on that host never rewrites the holder's); for
    TLSRoutes, passed through to the oldest route's backend. What was left out, per route
    ((kind, namespace, name))."""
    by_host: dict[tuple[str, str, str], list[_Attached]] = {}
    for attached in attachments:
        by_host.setdefault((attached.kind, attached.route[0], attached.host), []).append(attached)
    claims: dict[str, list[TunnelFacts]] = {}
    certificates: dict[Key, dict[Key, CertificateSpec]] = {}
    backends: set[BackendRef] = set()
    dropped: dict[tuple[str, str, str], list[str]] = {}
    by_http = {(ns, host) for (kind, ns, host) in by_host if kind == HTTP_ROUTE}
    for (kind, namespace, host), found in sorted(by_host.items()):
        source = source_of(namespace, kind)
        if kind == GRPC_ROUTE and (namespace, host) in by_http:
            for attached in found:  # (one host, one way of serving it, whatever the dates)
                dropped.setdefault((kind, *attached.route), []).append(
                    f"spec.hostnames: {host} is served by HTTPRoutes of this namespace; a "
                    "GRPCRoute needs a host of its own."
                )
            continue
        held = sum(len(claims.get(source_of(namespace, k), ())) for k in ALL_ROUTE_KINDS)
        if held >= MAX_HOSTS_PER_NAMESPACE:
            for attached in found:
                dropped.setdefault((kind, *attached.route), []).append(
                    f"spec.hostnames: {host} is not served: a namespace's routes serve at "
                    f"most {MAX_HOSTS_PER_NAMESPACE} hosts."
                )
            continue
        try:
            if kind == TLS_ROUTE or kind in PORT_ROUTE_KINDS:
                claim, refs = _passed_claim(kind, namespace, host, found, cluster_agent, seen,
                                            now)  # fmt: skip
                what = (
                    f"spec.parentRefs: port {host}/{PORT_ROUTE_KINDS[kind]} is passed by"
                    if claim.by_port else f"spec.hostnames: {host} is passed through by"
                )  # fmt: skip
                for other in {a.route for a in found} - {(namespace, claim.name)}:
                    dropped.setdefault((kind, *other), []).append(
                        f"{what} the older {kind} {claim.name} of this namespace, to its backend."
                    )
            else:
                made = _claim(namespace, host, found, cluster_agent, seen, now, dropped, kind)
                if made is None:
                    continue
                claim, (gateway, certificate, spec), refs = made
                certificates.setdefault(gateway, {})[certificate] = spec
        except Exception as error:  # (one odd host never costs the others theirs)
            for attached in found:
                dropped.setdefault((kind, *attached.route), []).append(
                    f"spec.hostnames: {host} is not served: {type(error).__name__}."
                )
            continue
        claims.setdefault(source, []).append(claim)
        backends |= refs
    return {k: tuple(v) for k, v in claims.items()}, certificates, backends, dropped


def port_domain(kind: str, namespace: str, port: int) -> str:
    """The name a claim on a public port alone goes by (a TCPRoute's, a UDPRoute's): where a
    claim needs a domain (streams to the agent, the mirror's row). Under ``.invalid``, which
    nobody can publish, and held by that claim alone (see :mod:`ownership`)."""
    return f"{kind.lower()}-{port}.{namespace}{PORT_DOMAIN_SUFFIX}"


def _passed_claim(
    kind: str, namespace: str, host: str, found: Sequence[_Attached], cluster_agent: Key,
    seen: Mapping[uuid.UUID, datetime], now: datetime,
) -> tuple[TunnelFacts, set[BackendRef]]:  # fmt: skip
    """A host of TLSRoutes (passed through by SNI), or a public port of TCPRoutes or UDPRoutes
    (``host``: the port), of one namespace: to the oldest route's backends by weight (none: its
    connections are refused). A port is claimed as an L4 Tunnel's is, against Tunnels and other
    namespaces' routes; a Gateway pool must open it."""
    first = min(found, key=lambda a: (a.created, a.route))
    refs = set(first.backends)
    identity = claim_id(namespace, host, kind)
    names = ", ".join(sorted({f"{namespace}/{a.route[1]}" for a in found}))
    port = int(host) if kind in PORT_ROUTE_KINDS else None
    claim = TunnelFacts(
        id=identity, namespace=namespace, name=first.route[1],
        domain=host if port is None else port_domain(kind, namespace, port),
        agent=cluster_agent[1], agent_namespace=cluster_agent[0], target=PASSTHROUGH_TARGET,
        enabled=True, created=seen.get(identity, now), generation=first.generation,
        certificate="", description=f"{kind} {names}"[:1024], source=f"{kind} {first.route[1]}",
        protocol=PORT_ROUTE_KINDS.get(kind, "TLS"), port=port, by_port=port is not None,
        backends=tuple(sorted(ref.stream for ref in refs)), shares=_several(first.shares),
    )  # fmt: skip
    return claim, refs


def _claim(
    namespace: str, host: str, found: Sequence[_Attached], cluster_agent: Key,
    seen: Mapping[uuid.UUID, datetime], now: datetime,
    dropped: dict[tuple[str, str, str], list[str]], kind: str = HTTP_ROUTE,
) -> tuple[TunnelFacts, tuple[Key, Key, CertificateSpec], set[BackendRef]] | None:  # fmt: skip
    """An HTTP host's claim, with its Certificate: the rules of the namespace's routes of
    ``kind`` attached with that host (GRPCRoutes: each call routed at the gateway, over h2c to
    its backend; or, when every call goes to one backend unchanged, HTTP/2 connections passed
    to it whole)."""
    routes: dict[Key, _Attached] = {}
    for attached in found:
        routes.setdefault(attached.route, attached)
    ordered = sorted(
        ((rank[:-2], a.created, a.route, rank[-2:]), rule)
        for a in routes.values() for rank, rule in a.rules
    )  # fmt: skip
    rules = [rule for _, rule in ordered]
    if len(rules) > MAX_RULES_PER_HOST:
        for route in routes:
            dropped.setdefault((kind, *route), []).append(
                f"spec.rules: {host} takes at most {MAX_RULES_PER_HOST} matches over all "
                "its routes; those of least precedence are not served."
            )
        rules = rules[:MAX_RULES_PER_HOST]
    refs = {ref for a in routes.values() for ref in a.backends}
    first_route = min(routes.values(), key=lambda a: (a.created, a.route))
    if not rules:
        return None
    # A gRPC host whose every call goes to one backend, unchanged: its HTTP/2 connections are
    # passed whole (faster); otherwise the gateway routes each call.
    passed = kind == GRPC_ROUTE and _one_way(rules)
    if passed:
        (only,) = [b.stream for b in rules[0].backends if b.weight > 0]
        refs = {ref for ref in refs if ref.stream == only}
    # The certificate: an HTTPS listener's before an HTTP one's (ACME); the most specific (its
    # hostname the host itself, then the longest wildcard); its own Secret before ACME; then
    # the Gateway and listener by name.
    giver = min(found, key=lambda a: (
        a.certificate is None, _specificity(a.listener_hostname, host),
        _preference(a.certificate), a.gateway, a.listener,
    ))  # fmt: skip
    source, secret, secret_namespace = giver.certificate or ("ACME", "", "")
    certificate = certificate_name(giver.gateway, host, namespace, kind)
    # (beside the Secret, which a Certificate reads from its own namespace: the Gateway's, or
    # the one whose ReferenceGrant lets the Gateway use it)
    where = secret_namespace if source == "Secret" else giver.gateway[0]
    spec = CertificateSpec(
        domain=host,
        secret_name=secret or f"{certificate}-tls",
        issuer="Secret" if source == "Secret" else "ACME",
    )
    identity = claim_id(namespace, host, kind)
    names = ", ".join(f"{namespace}/{r[1]}" for r in sorted(routes))
    claim = TunnelFacts(
        id=identity, namespace=namespace, name=first_route.route[1], domain=host,
        agent=cluster_agent[1], agent_namespace=cluster_agent[0],
        target=PASSTHROUGH_TARGET if passed else _target(refs), enabled=True,
        created=seen.get(identity, now), generation=first_route.generation,
        certificate=certificate, certificate_namespace=where, certificate_issuer=spec.issuer,
        description=f"{kind} {names}"[:1024], source=f"{kind} {first_route.route[1]}",
        rules=None if passed else tuple(rules),
        app_protocol="H2C" if kind == GRPC_ROUTE else "HTTP1",
        backends=tuple(sorted(ref.stream for ref in refs)),
    )  # fmt: skip
    return claim, (giver.gateway, (where, certificate), spec), refs


def _one_way(rules: Sequence[RequestRule]) -> bool:
    """Whether every request goes to one backend, unchanged: one rule, matching all, with one
    backend that resolves and no header edits."""
    if len(rules) != 1:
        return False
    (rule,) = rules
    every = not rule.matches or all(
        (m.path is None or (m.path.type == "PathPrefix" and m.path.value.strip("/") == ""))
        and not m.headers and not m.method and not m.query
        for m in rule.matches
    )  # fmt: skip
    live = [b for b in rule.backends if b.weight > 0]
    return every and len(live) == 1 and live[0].stream is not None and not rule.request_headers


def _several(shares: Shares) -> Shares:
    """Shares worth sending: with one backend, the tunnel's ``backend`` says it all (none
    resolved: nothing to reach either way)."""
    return shares if len(shares) > 1 else ()


@functools.lru_cache(maxsize=4096)
def _named(host: str) -> bool:
    """A host kakuremichi can publish (no wildcard); cached: routes name hosts many times."""
    return not host.startswith("*.") and is_domain(host)


def _target(refs: set[BackendRef]) -> str:
    """What the mirror row and messages name as the host's target."""
    if not refs:
        return PASSTHROUGH_TARGET
    first = min(refs)
    return f"{first.service}.{first.namespace}:{first.port}"


def _specificity(listener: str | None, host: str) -> int:
    """Smaller for a listener hostname that says more of ``host``."""
    if listener == host:
        return 0
    return 1000 - len(listener) if listener else 1000


def _preference(certificate: CertificateSource | None) -> int:
    """A listener's own Secret first, then ACME on HTTPS, then an HTTP listener (ACME)."""
    return 2 if certificate is None else 0 if certificate[0] == "Secret" else 1


# --- reading values -------------------------------------------------------------------------


def _age(body: Mapping[str, Any], key: Key) -> tuple[str, Key]:
    return _created(_map(body.get("metadata"))), key


def _created(meta: Mapping[str, Any]) -> str:
    return _text(meta.get("creationTimestamp"))


def _generation(meta: Mapping[str, Any]) -> int:
    value = meta.get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _list(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _list_text(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
