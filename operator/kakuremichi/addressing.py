"""WireGuard address plan: agent subnets, agent virtual IPs and gateway addresses.

The data-model document's rule: agent N (the lowest free N in 1..254) gets ``10.N.0.0/24`` and
the virtual IP ``10.N.0.100``. The document leaves gateway addresses open; here every gateway
instance gets a stable index g in 1..99 and the address ``10.N.0.g`` inside each agent's subnet,
so up to 99 gateways can reach one agent, each agent needs no route beyond its own /24, and the
agent answers each gateway on the address that gateway used. Hosts .101-.254 stay unused.

``10.N.0.0/24`` collides with common cluster ranges (kind's pods 10.244/16, kubeadm's services
10.96/12, ...), so a pool can exclude networks: an N whose subnet overlaps one is skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

AGENT_HOST = 100
GATEWAY_INDEX_FIRST = 1
GATEWAY_INDEX_LAST = AGENT_HOST - 1
SUBNET_FIRST = 1
SUBNET_LAST = 254


class AllocationError(Exception):
    """An allocation cannot be made; the message is meant for a status condition."""


class PoolExhausted(AllocationError):
    pass


class AllocationConflict(AllocationError):
    def __init__(self, number: int, holder: Hashable) -> None:
        super().__init__(f"{number} is already allocated to {holder}")
        self.number = number
        self.holder = holder


def subnet_for(number: int) -> IPv4Network:
    _check_subnet_number(number)
    return IPv4Network(f"10.{number}.0.0/24")


def virtual_ip_for(number: int) -> IPv4Address:
    _check_subnet_number(number)
    return IPv4Address(f"10.{number}.0.{AGENT_HOST}")


def gateway_address(subnet_number: int, gateway_index: int) -> IPv4Address:
    """Gateway g's WireGuard address inside agent N's subnet: ``10.N.0.g``."""
    _check_subnet_number(subnet_number)
    if not GATEWAY_INDEX_FIRST <= gateway_index <= GATEWAY_INDEX_LAST:
        raise ValueError(
            f"gateway index must be {GATEWAY_INDEX_FIRST}-{GATEWAY_INDEX_LAST}, got {gateway_index}"
        )
    return IPv4Address(f"10.{subnet_number}.0.{gateway_index}")


def subnet_number(subnet: str) -> int:
    """N of a subnet written ``10.N.0.0/24``."""
    try:
        network = IPv4Network(subnet)
    except ValueError:
        raise ValueError(f"{subnet!r} is not an IPv4 network") from None
    octets = network.network_address.packed
    if network.prefixlen != 24 or octets[0] != 10 or octets[2] != 0:
        raise ValueError(f"{subnet!r} is not an agent subnet of the form 10.N.0.0/24")
    _check_subnet_number(octets[1])
    return octets[1]


def _check_subnet_number(number: int) -> None:
    if not SUBNET_FIRST <= number <= SUBNET_LAST:
        raise ValueError(f"subnet number must be {SUBNET_FIRST}-{SUBNET_LAST}, got {number}")


@dataclass(frozen=True)
class AgentAddresses:
    number: int
    subnet: IPv4Network
    virtual_ip: IPv4Address

    @classmethod
    def of(cls, number: int) -> AgentAddresses:
        return cls(number=number, subnet=subnet_for(number), virtual_ip=virtual_ip_for(number))


@dataclass(frozen=True)
class SubnetPool:
    """Which N may be handed out: ``first..last`` minus subnets overlapping ``excluded``."""

    first: int = SUBNET_FIRST
    last: int = SUBNET_LAST
    excluded: tuple[IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        if not SUBNET_FIRST <= self.first <= self.last <= SUBNET_LAST:
            raise ValueError(
                f"subnet pool must satisfy {SUBNET_FIRST} <= first <= last <= {SUBNET_LAST}, "
                f"got first={self.first} last={self.last}"
            )

    @classmethod
    def parse(cls, first: int, last: int, excluded: Iterable[str] = ()) -> SubnetPool:
        networks = []
        for text in excluded:
            try:
                networks.append(IPv4Network(text, strict=False))
            except ValueError:
                raise ValueError(f"excluded range {text!r} is not an IPv4 CIDR") from None
        return cls(first=first, last=last, excluded=tuple(networks))

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int) or not self.first <= number <= self.last:
            return False
        subnet = subnet_for(number)
        return not any(subnet.overlaps(network) for network in self.excluded)

    def __iter__(self) -> Iterator[int]:
        return (n for n in range(self.first, self.last + 1) if n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def describe(self) -> str:
        text = f"10.{self.first}.0.0/24-10.{self.last}.0.0/24"
        if self.excluded:
            text += " excluding " + ", ".join(str(n) for n in self.excluded)
        return text


def lowest_free(candidates: Iterable[int], used: Iterable[int]) -> int | None:
    """The document's rule: the lowest candidate not in use."""
    taken = set(used)
    return next((n for n in candidates if n not in taken), None)


class NumberAllocator:
    """Hands out numbers from a fixed sequence to owners, lowest free first.

    Thread-safe, and idempotent per owner: asking again for the same owner returns its number,
    so a reconcile that runs twice (or two that race) never takes two numbers.
    """

    def __init__(self, candidates: Iterable[int], what: str) -> None:
        self._candidates = tuple(candidates)
        self._what = what
        self._lock = threading.Lock()
        self._by_owner: dict[Hashable, int] = {}
        self._by_number: dict[int, Hashable] = {}

    def allocate(self, owner: Hashable) -> int:
        with self._lock:
            if owner in self._by_owner:
                return self._by_owner[owner]
            number = lowest_free(self._candidates, self._by_number)
            if number is None:
                raise PoolExhausted(
                    f"no free {self._what}: all {len(self._candidates)} are allocated"
                )
            self._take(owner, number)
            return number

    def restore(self, owner: Hashable, number: int) -> None:
        """Record an allocation made earlier (read back from status after a restart)."""
        with self._lock:
            holder = self._by_number.get(number)
            if holder is not None and holder != owner:
                raise AllocationConflict(number, holder)
            previous = self._by_owner.get(owner)
            if previous is not None and previous != number:
                del self._by_number[previous]
            self._take(owner, number)

    def release(self, owner: Hashable) -> int | None:
        with self._lock:
            number = self._by_owner.pop(owner, None)
            if number is not None:
                del self._by_number[number]
            return number

    def number_of(self, owner: Hashable) -> int | None:
        with self._lock:
            return self._by_owner.get(owner)

    def holder_of(self, number: int) -> Hashable | None:
        with self._lock:
            return self._by_number.get(number)

    def allocations(self) -> Mapping[Hashable, int]:
        with self._lock:
            return dict(self._by_owner)

    def _take(self, owner: Hashable, number: int) -> None:
        self._by_owner[owner] = number
        self._by_number[number] = owner


class SubnetAllocator:
    """Agent subnets from a :class:`SubnetPool`."""

    def __init__(self, pool: SubnetPool | None = None) -> None:
        self.pool = pool or SubnetPool()
        self._numbers = NumberAllocator(self.pool, f"agent subnet in {self.pool.describe()}")

    def allocate(self, owner: Hashable) -> AgentAddresses:
        return AgentAddresses.of(self._numbers.allocate(owner))

    def restore(self, owner: Hashable, subnet: str) -> AgentAddresses:
        """Re-register ``owner``'s subnet from status. A subnet outside the current pool is kept:
        narrowing the pool must not renumber agents that already have addresses."""
        number = subnet_number(subnet)
        self._numbers.restore(owner, number)
        return AgentAddresses.of(number)

    def release(self, owner: Hashable) -> None:
        self._numbers.release(owner)

    def holder_of(self, subnet: str) -> Hashable | None:
        return self._numbers.holder_of(subnet_number(subnet))


class GatewayIndexAllocator:
    """Stable gateway indexes g in 1..99."""

    def __init__(self) -> None:
        self._numbers = NumberAllocator(
            range(GATEWAY_INDEX_FIRST, GATEWAY_INDEX_LAST + 1), "gateway index"
        )

    def allocate(self, owner: Hashable) -> int:
        return self._numbers.allocate(owner)

    def restore(self, owner: Hashable, index: int) -> None:
        if not GATEWAY_INDEX_FIRST <= index <= GATEWAY_INDEX_LAST:
            raise ValueError(f"gateway index must be 1-{GATEWAY_INDEX_LAST}, got {index}")
        self._numbers.restore(owner, index)

    def release(self, owner: Hashable) -> None:
        self._numbers.release(owner)
