"""Where a route backend's connections go: the ready endpoints of a Service port, read from the
Service's EndpointSlices as ingress controllers read them. Pure.

EndpointSlices are namespaced objects a tenant may write by hand (a Service without selector, as
the demo does for a server outside the cluster), so their addresses are hostile input: the
cluster agent runs in the system namespace and would otherwise connect wherever a slice points.
An address is never used when it is loopback, link-local (cloud metadata lives there, and at
``fd00:ec2::254`` and ``100.100.100.200``), unspecified, multicast, in ``0.0.0.0/8``, or an IPv6
form that carries an IPv4 address (mapped, compatible, SIIT, NAT64, 6to4, Teredo: they would
reach the address they carry), nor when it is ``foreign``: the operator passes the addresses of
other namespaces' pods, every Service's cluster IP (kube-proxy would forward to that Service's
pods, whatever their namespace) and the nodes', so that no tenant reaches another's pods, or a
node's own services, through a slice of its own. ``allowed``, when given, is the only space
addresses may come from (e.g. the pod network plus the ranges an administrator opens).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kakuremichi.control.ingress_routes import BackendRef

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_ENDPOINTS = 1000
"""As many as an agent's config takes per backend (the first, in address order)."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NEVER = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.100.100.200/32", "fd00:ec2::254/128",
    "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48",
    "2002::/16", "2001::/32",
))  # fmt: skip
"""Beyond loopback, link-local, unspecified and multicast: cloud metadata elsewhere, and IPv6
forms that carry an IPv4 address."""


def usable(
    address: str, foreign: Collection[str] = (), allowed: Sequence[Network] | None = None
) -> bool:
    """Whether the cluster agent may connect to ``address`` for a route of this namespace."""
    return _usable(address, _addresses(foreign), allowed)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _usable(address: str, foreign: set[Address], allowed: Sequence[Network] | None) -> bool:
    if "%" in address:
        return False  # (a scoped IPv6 address would compare unequal to the one it names)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    if any(ip.version == n.version and ip in n for n in NEVER):
        return False
    if allowed is not None and not any(ip.version == n.version and ip in n for n in allowed):
        return False
    return ip not in foreign


def _addresses(texts: Iterable[str]) -> set[Address]:
    found: set[Address] = set()
    for text in texts:
        try:
            found.add(ipaddress.ip_address(text))
        except ValueError:
            continue
    return found


@dataclass
class AddressBook:
    """Whose each address is, parsed once per decision (not once per backend: a cluster's pods
    times its backends would be quadratic): pods by namespace, addresses a namespace chose or
    stands behind (``externalIPs``, the admin namespaces' slices), and those shared by all
    (cluster IPs, nodes)."""

    pods: dict[Address, set[str]] = field(default_factory=dict)
    chosen: dict[Address, set[str]] = field(default_factory=dict)
    shared: set[Address] = field(default_factory=set)

    def add_pods(self, namespace: str, addresses: Iterable[str]) -> None:
        for address in _addresses(addresses):
            self.pods.setdefault(address, set()).add(namespace)

    def add_chosen(self, namespace: str, addresses: Iterable[str]) -> None:
        for address in _addresses(addresses):
            self.chosen.setdefault(address, set()).add(namespace)

    def add_shared(self, addresses: Iterable[str]) -> None:
        self.shared |= _addresses(addresses)

    def own(self, namespace: str, address: Address) -> bool:
        return namespace in self.pods.get(address, ())

    def foreign(self, namespace: str, address: Address) -> bool:
        if address in self.shared:
            return True
        return any(
            owners - {namespace}
            for owners in (self.pods.get(address, set()), self.chosen.get(address, set()))
        )


def ready_endpoints(
    ref: BackendRef, slices: Iterable[Mapping[str, Any]], foreign: Collection[str] = (),
    allowed: Sequence[Network] | None = None, own: Collection[str] = (),
    book: AddressBook | None = None,
) -> list[str]:  # fmt: skip
    """``ip:port`` (``[ip]:port`` for IPv6) of every ready endpoint of the Service port ``ref``,
    from the EndpointSlices of its Service (others are ignored), sorted, at most
    :data:`MAX_ENDPOINTS`. An address in ``own`` (the pods of the route's namespace) is usable
    whatever ``foreign`` and ``allowed`` say (never when loopback, link-local and the like).
    ``book``, when given, says which are the namespace's own and which foreign instead."""
    found: set[tuple[int, str, int]] = set()
    blocked, mine = _addresses(foreign), _addresses(own)
    for piece in slices:
        if not isinstance(piece, Mapping):
            continue
        metadata = _mapping(piece.get("metadata"))
        labels = _mapping(metadata.get("labels"))
        if metadata.get("namespace") != ref.namespace:
            continue
        if labels.get(SERVICE_NAME_LABEL) != ref.service:
            continue
        if piece.get("addressType") not in ("IPv4", "IPv6"):
            continue  # (FQDN: a name to resolve is a place the tenant chooses at any time)
        port = _port(piece.get("ports"), ref.port_name, ref.protocol)
        if port is None:
            continue
        endpoints = piece.get("endpoints")
        for endpoint in endpoints if isinstance(endpoints, list) else ():
            if not isinstance(endpoint, Mapping):
                continue
            if _mapping(endpoint.get("conditions")).get("ready") is False:
                continue  # (unset means ready, says the API)
            addresses = endpoint.get("addresses")
            if not isinstance(addresses, list) or not addresses:
                continue
            address = str(addresses[0])  # (the addresses of one endpoint are fungible)
            parsed = _parsed(address)
            if book is not None and parsed is not None:
                if book.own(ref.namespace, parsed):
                    mine.add(parsed)
                elif book.foreign(ref.namespace, parsed):
                    blocked.add(parsed)
            usable = (
                _usable(address, set(), None) if parsed in mine
                else _usable(address, blocked, allowed)
            )  # fmt: skip
            if not usable:
                continue
            ip = ipaddress.ip_address(address)
            found.add((ip.version, str(ip), port))
    ordered = sorted(found, key=lambda e: (e[0], ipaddress.ip_address(e[1]), e[2]))
    return [
        f"[{address}]:{port}" if version == 6 else f"{address}:{port}"
        for version, address, port in ordered[:MAX_ENDPOINTS]
    ]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _parsed(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _port(ports: object, name: str, protocol: str = "TCP") -> int | None:
    """The slice's number for the Service port named ``name`` ("" for an unnamed one) and
    ``protocol``."""
    if not isinstance(ports, list):
        return None
    for port in ports:
        if not isinstance(port, Mapping):
            continue
        if str(port.get("name") or "") != name or str(port.get("protocol") or "TCP") != protocol:
            continue
        number = port.get("port")
        if isinstance(number, int) and 1 <= number <= 65535:
            return number
    return None
