"""What an Ingress of class ``kakuremichi`` asks to serve: per host, the rules the gateways apply
to each request and the Service ports they lead to. Pure: the operator feeds it an Ingress and
the Services of its namespace; the ownership decision then weighs each host's claim against
Tunnels' and other routes' (issue 21).

Follows the Ingress API as ingress controllers read it: ``pathType`` Exact or Prefix (by whole
path segments; ImplementationSpecific is read as Prefix), the longest matching path first and
Exact before Prefix at equal length, ``defaultBackend`` for what no path of a host matches.
Backends come from the Ingress's own namespace only (an Ingress cannot name another), by a port
of a Service that exists there; what cannot be served is said once per field, in a sentence,
and the rest is served.

Kakuremichi publishes named hosts: a rule without ``host`` or with a wildcard is refused (a
wildcard certificate would need DNS-01), as is a ``resource`` backend. Every value is checked
for its type as well (the API server's schema is not this module's guarantee): nothing an
Ingress or Service says raises here.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kakuremichi.api import validation
from kakuremichi.api.protocol import PathMatch, RequestMatch, RequestRule, WeightedBackend
from kakuremichi.api.request_paths import PathRefused, normalize_path
from kakuremichi.control.ownership import TunnelFacts

INGRESS_CLASS = "kakuremichi"
INGRESS_CONTROLLER = "kakuremichi.io/ingress-controller"
CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
MAX_PATHS_PER_HOST = 500
"""Within what a gateway takes for one host (1,000 rules, 2,048 conditions)."""
_HOST = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$"
)
_PATH = re.compile(r"^/[-A-Za-z0-9._~!$&'()*+,;=:@/%]{0,1023}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class ServicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    """TCP or UDP (a UDPRoute's backend); Ingresses and HTTP routes take TCP ports only."""


@dataclass(frozen=True)
class ServiceFacts:
    """What routing needs of a Service: its ports, and whether it has endpoints of its own."""

    name: str
    ports: tuple[ServicePort, ...]
    external_name: bool = False
    """type ExternalName: no endpoints to reach (refused: it would let a route name any host)."""

    @classmethod
    def of(cls, service: Mapping[str, Any]) -> ServiceFacts:
        spec = _map(service.get("spec"))
        ports = tuple(
            ServicePort(p["port"], _text(p.get("name")), p.get("protocol") or "TCP")
            for p in _list(spec.get("ports"))
            if _is_port(p.get("port")) and (p.get("protocol") or "TCP") in ("TCP", "UDP")
        )
        return cls(str(_map(service.get("metadata")).get("name", "")), ports,
                   spec.get("type") == "ExternalName")  # fmt: skip


@dataclass(frozen=True, order=True)
class BackendRef:
    """A Service port a route leads to; its stream name is what gateways and the agent say."""

    namespace: str
    service: str
    port: int
    port_name: str = field(default="", compare=False)
    """The Service port's name, which its EndpointSlices' ports carry."""
    protocol: str = "TCP"
    """TCP, or UDP (a UDPRoute's backend)."""

    @property
    def stream(self) -> str:
        """Its name in the edges' configs (a UDP port's with ``/udp``: a Service may have TCP
        and UDP ports of one number)."""
        suffix = "/udp" if self.protocol == "UDP" else ""
        return f"{self.namespace}/{self.service}:{self.port}{suffix}"


@dataclass
class HostRoutes:
    """One host of an Ingress: its rules, in order of precedence, and where they lead."""

    host: str
    rules: list[RequestRule] = field(default_factory=list)
    backends: set[BackendRef] = field(default_factory=set)
    tls_secret: str | None = None
    """``spec.tls[].secretName`` covering the host (None: a certificate from ACME)."""


@dataclass
class IngressRoutes:
    hosts: dict[str, HostRoutes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One sentence per field that cannot be served, the field named first."""


def is_ours(
    ingress: Mapping[str, Any], default_class: bool, classes: Collection[str] = (INGRESS_CLASS,)
) -> bool:
    """Whether an Ingress is ours: by ``spec.ingressClassName`` naming one of ``classes`` (the
    IngressClasses of our controller), else the old annotation naming ``kakuremichi``, else
    (neither set) when one of our IngressClasses is the cluster's default."""
    spec = _map(ingress.get("spec"))
    named = spec.get("ingressClassName")
    if named is not None:
        return isinstance(named, str) and (named in classes or named == INGRESS_CLASS)
    annotated = _map(_map(ingress.get("metadata")).get("annotations")).get(CLASS_ANNOTATION)
    return annotated == INGRESS_CLASS if annotated is not None else default_class


def ingress_routes(
    ingress: Mapping[str, Any], services: Mapping[str, ServiceFacts]
) -> IngressRoutes:
    """The hosts an Ingress asks for, with their rules; ``services``: its namespace's, by name."""
    namespace = str(_map(ingress.get("metadata")).get("namespace", ""))
    spec = _map(ingress.get("spec"))
    out = IngressRoutes()
    paths: dict[str, list[tuple[_Ranked, RequestRule, BackendRef]]] = {}
    for r, rule in enumerate(_list(spec.get("rules"))):
        at = f"spec.rules[{r}]"
        host = _text(rule.get("host"))
        if not host:
            out.problems.append(f"{at}.host: kakuremichi publishes named hosts only; give this "
                                "rule a host such as app.example.com.")  # fmt: skip
            continue
        if host.startswith("*."):
            out.problems.append(f"{at}.host: wildcard hosts are not served (their certificate "
                                "would need DNS-01); name each host.")  # fmt: skip
            continue
        if not _HOST.fullmatch(host) or not is_domain(host):
            out.problems.append(f"{at}.host: must be a lower-case DNS name such as "
                                "app.example.com.")  # fmt: skip
            continue
        entries = paths.setdefault(host, [])
        for p, path in enumerate(_list(_map(rule.get("http")).get("paths"))):
            if len(entries) >= MAX_PATHS_PER_HOST:
                out.problems.append(f"{at}.http.paths[{p}]: a host has at most "
                                    f"{MAX_PATHS_PER_HOST} paths; this one and those after it "
                                    "are not served.")  # fmt: skip
                break
            entry = _path_rule(path, f"{at}.http.paths[{p}]", namespace, services, out.problems)
            if entry is not None:
                entries.append(entry)
    default = None
    if spec.get("defaultBackend"):
        ref = _backend(_map(spec["defaultBackend"]), "spec.defaultBackend", namespace, services,
                       out.problems)  # fmt: skip
        if ref is not None:
            default = ref
            if not paths:
                out.problems.append("spec.defaultBackend: served on the hosts of spec.rules "
                                    "only; kakuremichi publishes named hosts.")  # fmt: skip
    for host, entries in paths.items():
        ordered = sorted(entries, key=lambda e: e[0])  # (stable: declaration order breaks ties)
        routes = out.hosts[host] = HostRoutes(host)
        routes.rules = [rule for _, rule, _ in ordered]
        routes.backends = {ref for _, _, ref in ordered}
        if default is not None:
            routes.rules.append(RequestRule(backends=[WeightedBackend(stream=default.stream)]))
            routes.backends.add(default)
    _tls(spec, out)
    return out


@dataclass(frozen=True, order=True)
class _Ranked:
    """Ingress precedence: the longest path first, then Exact before Prefix."""

    length: int
    prefix: bool


def _path_rule(
    path: Mapping[str, Any], at: str, namespace: str, services: Mapping[str, ServiceFacts],
    problems: list[str],
) -> tuple[_Ranked, RequestRule, BackendRef] | None:  # fmt: skip
    kind = path.get("pathType") or "ImplementationSpecific"
    if kind not in ("Exact", "Prefix", "ImplementationSpecific"):
        problems.append(f"{at}.pathType: must be Exact, Prefix or ImplementationSpecific.")
        return None
    value = path.get("path") or "/"
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        problems.append(f"{at}.path: must be an absolute path such as /api, without a query.")
        return None
    try:
        normal = normalize_path(value.encode()).decode()
    except PathRefused as refusal:
        problems.append(f"{at}.path: {refusal}".replace("on this host", "here"))
        return None
    ref = _backend(_map(path.get("backend")), f"{at}.backend", namespace, services, problems)
    if ref is None:
        return None
    exact = kind == "Exact"
    try:
        match = PathMatch(type="Exact" if exact else "PathPrefix", value=value)
        rule = RequestRule(
            matches=[RequestMatch(path=match)], backends=[WeightedBackend(stream=ref.stream)]
        )
    except ValidationError:
        problems.append(f"{at}.path: must be an absolute path such as /api, without a query.")
        return None
    # Ranked as the gateways will read it (``/./././`` is ``/``, however long it looks).
    length = len(normal if exact else normal.rstrip("/"))
    return _Ranked(-length, not exact), rule, ref


def _backend(
    backend: Mapping[str, Any], at: str, namespace: str, services: Mapping[str, ServiceFacts],
    problems: list[str],
) -> BackendRef | None:  # fmt: skip
    if backend.get("resource"):
        problems.append(f"{at}.resource: only Service backends are served.")
        return None
    service = _map(backend.get("service"))
    name = _text(service.get("name"))
    if not _NAME.fullmatch(name):
        problems.append(f"{at}.service.name: must name a Service of this namespace.")
        return None
    facts = services.get(name)
    if facts is None:
        problems.append(f"{at}.service.name: there is no Service {name} in this namespace.")
        return None
    if facts.external_name:
        problems.append(f"{at}.service.name: Service {name} is of type ExternalName, which "
                        "is not served (it has no endpoints in the cluster).")  # fmt: skip
        return None
    port = _map(service.get("port"))
    wanted_number, wanted_name = port.get("number"), port.get("name")
    if not _is_port(wanted_number):
        wanted_number = None
    if not isinstance(wanted_name, str) or not wanted_name:
        wanted_name = None
    if wanted_number is None and wanted_name is None:
        problems.append(f"{at}.service.port: give the Service port's number or name.")
        return None
    for candidate in facts.ports:
        if candidate.protocol != "TCP":
            continue
        if (wanted_number is not None and candidate.port == wanted_number) or (
            wanted_name is not None and candidate.name == wanted_name
        ):
            return BackendRef(namespace, name, candidate.port, candidate.name)
    said = wanted_number if wanted_number is not None else wanted_name
    problems.append(f"{at}.service.port: Service {name} has no TCP port {said}.")
    return None


def _tls(spec: Mapping[str, Any], out: IngressRoutes) -> None:
    for t, tls in enumerate(_list(spec.get("tls"))):
        secret = tls.get("secretName")
        if secret is not None and not (isinstance(secret, str) and _NAME.fullmatch(secret)):
            out.problems.append(f"spec.tls[{t}].secretName: must name a Secret of this "
                                "namespace.")  # fmt: skip
            continue
        hosts = tls.get("hosts")
        for host in hosts if isinstance(hosts, list) else ():
            routes = out.hosts.get(host) if isinstance(host, str) else None
            if routes is not None and routes.tls_secret is None and secret:
                routes.tls_secret = str(secret)


def _list(value: object) -> Sequence[Mapping[str, Any]]:
    if not isinstance(value, list):
        return ()
    return [v for v in value if isinstance(v, Mapping)]


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def is_domain(host: str) -> bool:
    """As a Tunnel's domain must be (no numeric last label, as the API server allows)."""
    try:
        validation.domain_name(host)
    except ValueError:
        return False
    return True


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def backends_of(routes: Iterable[IngressRoutes]) -> set[BackendRef]:
    """Every Service port some host of these routes leads to."""
    return {ref for r in routes for host in r.hosts.values() for ref in host.backends}


def certificate_name(ingress: str, host: str) -> str:
    """The Certificate object that serves ``host`` of Ingress ``ingress`` (same namespace): the
    digest covers the whole name, so long names that share a prefix never meet."""
    digest = hashlib.sha256(f"{ingress}/{host}".encode()).hexdigest()[:16]
    return f"{ingress[:40].rstrip('-.')}-{digest}"


def claim_id(ingress_uid: str, host: str) -> uuid.UUID:
    """The same for the same Ingress and host, and never a Kubernetes uid (those are v4)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"kakuremichi:ingress:{ingress_uid}/{host}")


def host_claims(
    ingress: Mapping[str, Any], routes: IngressRoutes, cluster_agent: tuple[str, str],
    seen: Mapping[uuid.UUID, datetime], now: datetime,
) -> tuple[TunnelFacts, ...]:  # fmt: skip
    """Each host an Ingress asks for, as a claim in the one ownership decision, served through
    the cluster agent (``(namespace, name)``) by the host's rules.

    A claim dates from when the operator first saw that host in that Ingress (``seen``, else
    ``now``), never from the Ingress's creation: hosts of an Ingress can be edited, and an old
    Ingress edited today to name a domain someone holds would otherwise be the oldest claim on
    it. (Whoever feeds this must keep ``seen`` across restarts, as Tunnels' claims are kept.)
    """
    metadata = _map(ingress.get("metadata"))
    namespace, name = str(metadata.get("namespace", "")), str(metadata.get("name", ""))
    uid = str(metadata.get("uid", ""))
    claims = []
    for host, served in sorted(routes.hosts.items()):
        if not served.rules:
            continue  # (every path of it was refused: nothing to serve, nothing to hold)
        first = min(served.backends)
        identity = claim_id(uid, host)
        claims.append(TunnelFacts(
            id=identity,
            namespace=namespace, name=name, domain=host, agent=cluster_agent[1],
            agent_namespace=cluster_agent[0],
            target=f"{first.service}.{first.namespace}:{first.port}",
            enabled=True, created=seen.get(identity, now),
            generation=int(metadata.get("generation") or 0),
            certificate=certificate_name(name, host), description=f"Ingress {namespace}/{name}",
            certificate_issuer="Secret" if served.tls_secret else "ACME",
            source=f"Ingress {name}", rules=tuple(served.rules),
            backends=tuple(sorted(ref.stream for ref in served.backends)),
        ))  # fmt: skip
    return tuple(claims)
