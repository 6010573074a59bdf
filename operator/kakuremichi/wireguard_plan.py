"""What an edge's WireGuard interface should look like, and how to get there incrementally.

Pure: from a pushed config to an :class:`InterfacePlan` (key, port, addresses, peers), and from
two plans to the UAPI ``set`` request that turns one into the other without touching peers that
did not change (so their sessions, and the connections riding them, are never interrupted).
The same plan drives kernel WireGuard (netlink) and wireguard-go (its UAPI socket).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from kakuremichi.protocol import AgentConfig, GatewayConfig

AGENT_KEEPALIVE_SECONDS = 25


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    keepalive: int | None = None


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
            )
            for gateway in config.gateways
        ),
    )


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


def uapi_set(target: InterfacePlan, current: InterfacePlan | None = None) -> str:
    """The UAPI ``set`` request turning ``current`` (None: a fresh interface) into ``target``."""
    lines = ["set=1"]
    if current is None or current.private_key != target.private_key:
        lines.append(f"private_key={_hex(target.private_key)}")
    if target.listen_port is not None and (
        current is None or current.listen_port != target.listen_port
    ):
        lines.append(f"listen_port={target.listen_port}")
    before = current.peers_by_key if current else {}
    for key in sorted(set(before) - set(target.peers_by_key)):
        lines += [f"public_key={_hex(key)}", "remove=true"]
    for key, peer in sorted(target.peers_by_key.items()):
        if before.get(key) == peer:
            continue  # untouched: its session and traffic go on
        lines += [f"public_key={_hex(key)}", "replace_allowed_ips=true"]
        lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
        if peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.keepalive}")
    return "\n".join(lines) + "\n\n"


def address_changes(
    target: InterfacePlan, current: InterfacePlan | None
) -> tuple[list[str], list[str]]:
    """Addresses to add and to remove."""
    before = set(current.addresses) if current else set()
    after = set(target.addresses)
    return sorted(after - before), sorted(before - after)
