"""What an edge's WireGuard interface should look like, and how to get there incrementally.

Pure: from a pushed config to an :class:`InterfacePlan` (key, port, addresses, peers), and from
two plans to the changes (:func:`plan_changes`) that turn one into the other without touching
peers that did not change (so their sessions, and the connections riding them, are never
interrupted). The changes are spelled as a UAPI ``set`` request for wireguard-go
(:func:`uapi_set`) or as pyroute2 peer dicts for kernel WireGuard (:func:`netlink_peer`).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field

from kakuremichi.api.protocol import AgentConfig, GatewayConfig

AGENT_KEEPALIVE_SECONDS = 25


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    keepalive: int | None = None
    session: str | None = None
    """The remote process's boot id, when known: a new one means the remote restarted and our
    session with it is dead; the peer is then removed and added again, which starts a new
    handshake at once (the keepalive's first packet) instead of after the old session's
    rekey time (up to two minutes of a dead tunnel for an agent behind NAT)."""


@dataclass(frozen=True)
class InterfacePlan:
    private_key: str
    addresses: tuple[str, ...]
    """CIDR addresses of the interface."""
    peers: tuple[Peer, ...] = ()
    listen_port: int | None = None
    peers_by_key: dict[str, Peer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers_by_key", {p.public_key: p for p in self.peers})


def agent_plan(config: AgentConfig, private_key: str) -> InterfacePlan:
    """An agent dials every gateway; each gateway may use only its own address in the subnet."""
    prefix = config.agent.subnet.rsplit("/", 1)[1]
    return InterfacePlan(
        private_key=private_key,
        addresses=(f"{config.agent.virtual_ip}/{prefix}",),
        peers=tuple(
            Peer(
                public_key=gateway.wireguard_public_key,
                allowed_ips=(f"{gateway.address}/32",),
                endpoint=f"{gateway.public_ip}:{gateway.wireguard_port}",
                keepalive=AGENT_KEEPALIVE_SECONDS,  # agents sit behind NAT: keep the path open
                session=gateway.boot,
            )
            for gateway in config.gateways
        ),
    )


def keep_sessions(target: InterfacePlan, current: InterfacePlan | None) -> InterfacePlan:
    """``target`` with the boot ids it does not know taken from ``current``: a config that
    lacks one (a control that has not seen the gateway since it restarted) must not hide a
    later change of it."""
    if current is None or all(p.session is not None for p in target.peers):
        return target
    peers = tuple(
        dataclasses.replace(peer, session=current.peers_by_key[peer.public_key].session)
        if peer.session is None and peer.public_key in current.peers_by_key
        else peer
        for peer in target.peers
    )
    return dataclasses.replace(target, peers=peers)


def gateway_plan(config: GatewayConfig, private_key: str) -> InterfacePlan:
    """A gateway listens; it holds its own address inside every agent's subnet and reaches
    each agent only at its virtual IP."""
    return InterfacePlan(
        private_key=private_key,
        listen_port=config.gateway.wireguard_port,
        addresses=tuple(
            f"{agent.address}/{agent.subnet.rsplit('/', 1)[1]}" for agent in config.agents
        ),
        peers=tuple(
            Peer(public_key=agent.wireguard_public_key, allowed_ips=(f"{agent.virtual_ip}/32",))
            for agent in config.agents
        ),
    )


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


@dataclass(frozen=True)
class PlanChanges:
    """What differs between two plans; ``None`` and empty mean "leave as it is"."""

    private_key: str | None
    listen_port: int | None
    removed: tuple[str, ...]
    """Public keys of peers to drop (a peer whose remote restarted is dropped, then added
    again with the changed ones: a fresh session)."""
    changed: tuple[Peer, ...]
    """Peers that are new or differ; each is (re)configured whole."""


def plan_changes(target: InterfacePlan, current: InterfacePlan | None = None) -> PlanChanges:
    """What turns ``current`` (None: a fresh interface) into ``target``; peers equal in both are
    left out so their sessions go on. Both drivers (UAPI and netlink) apply exactly this."""
    before = current.peers_by_key if current else {}
    restarted = {
        key
        for key, peer in target.peers_by_key.items()
        if (old := before.get(key)) is not None
        and None not in (old.session, peer.session)
        and old.session != peer.session
    }
    return PlanChanges(
        private_key=(
            target.private_key
            if current is None or current.private_key != target.private_key
            else None
        ),
        listen_port=(
            target.listen_port
            if current is None or current.listen_port != target.listen_port
            else None
        ),
        removed=tuple(sorted((set(before) - set(target.peers_by_key)) | restarted)),
        changed=tuple(
            peer for key, peer in sorted(target.peers_by_key.items()) if before.get(key) != peer
        ),
    )


def uapi_set(target: InterfacePlan, current: InterfacePlan | None = None) -> str:
    """The UAPI ``set`` request turning ``current`` (None: a fresh interface) into ``target``."""
    changes = plan_changes(target, current)
    lines = ["set=1"]
    if changes.private_key is not None:
        lines.append(f"private_key={_hex(changes.private_key)}")
    if changes.listen_port is not None:
        lines.append(f"listen_port={changes.listen_port}")
    for key in changes.removed:
        lines += [f"public_key={_hex(key)}", "remove=true"]
    for peer in changes.changed:
        lines += [f"public_key={_hex(peer.public_key)}", "replace_allowed_ips=true"]
        lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
        if peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.keepalive}")
    return "\n".join(lines) + "\n\n"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"203.0.113.1:51820"`` or ``"[2001:db8::1]:51820"`` as (address, port)."""
    address, colon, port = endpoint.rpartition(":")
    if not colon or not address or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not address:port")
    return address.removeprefix("[").removesuffix("]"), int(port)


def netlink_peer(peer: Peer) -> dict[str, object]:
    """The peer as pyroute2's ``WireGuard.set(peer=...)`` takes it, with the same fields (and the
    same allowed-IP replacement) as the peer's section of :func:`uapi_set`."""
    fields: dict[str, object] = {
        "public_key": peer.public_key,
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
    }
    if peer.endpoint:
        fields["endpoint_addr"], fields["endpoint_port"] = split_endpoint(peer.endpoint)
    if peer.keepalive is not None:
        fields["persistent_keepalive"] = peer.keepalive
    return fields


def address_changes(
    target: InterfacePlan, current: InterfacePlan | None
) -> tuple[list[str], list[str]]:
    """Addresses to add and to remove."""
    before = set(current.addresses) if current else set()
    after = set(target.addresses)
    return sorted(after - before), sorted(before - after)
