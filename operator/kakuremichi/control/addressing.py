"""WireGuard address plan: agent subnets, agent virtual IPs and gateway addresses.

The data-model document's rule: agent N (the lowest free N in 1..254) gets ``10.N.0.0/24`` and
the virtual IP ``10.N.0.100``. The document leaves gateway addresses open; here every gateway
instance gets a stable index g in 1..99 and the address ``10.N.0.g`` inside each agent's subnet,
so up to 99 gateways can reach one agent, each agent needs no route beyond its own /24, and the
agent answers each gateway on the address that gateway used. Hosts .101-.254 stay unused.

The document's plan holds 254 agents. An enlarged pool (``third_octets`` K > 1, a departure)
also holds ``10.N.M.0/24`` for M in 1..K-1, virtual IP ``10.N.M.100``, gateway g at
``10.N.M.g``. Allocation goes in (M, N) order — every ``10.N.0.0/24`` first — so enlarging the
pool never moves an agent and the first 254 agents get the document's subnets.

A subnet is named by its *number* ``M * 256 + N``: numbers 1..254 are the document's
``10.N.0.0/24``, and numeric order is the allocation order.

``10.N.0.0/24`` collides with common cluster ranges (kind's pods 10.244/16, kubeadm's services
10.96/12, ...), so a pool can exclude networks: every candidate /24 that overlaps one is skipped.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

AGENT_HOST = 100
GATEWAY_INDEX_FIRST = 1
GATEWAY_INDEX_LAST = AGENT_HOST - 1
SUBNET_FIRST = 1
SUBNET_LAST = 254
THIRD_OCTETS_MAX = 256
"""At most M in 0..255: ``10.N.M.0/24``."""


class AllocationError(Exception):
    """An allocation cannot be made; the message is meant for a status condition."""


class PoolExhausted(AllocationError):
    pass


class AllocationConflict(AllocationError):
    def __init__(self, number: int, holder: Hashable, label: str | None = None) -> None:
        super().__init__(f"{label or number} is already allocated to {holder}")
        self.number = number
        self.holder = holder


def number_for(second: int, third: int = 0) -> int:
    """The number of ``10.<second>.<third>.0/24``: ``third * 256 + second``."""
    number = third * 256 + second
    _check_subnet_number(number)
    return number


def octets_of(number: int) -> tuple[int, int]:
    """(N, M) of subnet number ``number``: its subnet is ``10.N.M.0/24``."""
    _check_subnet_number(number)
    return number % 256, number // 256


def subnet_for(number: int) -> IPv4Network:
    return IPv4Network(subnet_text(number))


def virtual_ip_for(number: int) -> IPv4Address:
    return IPv4Address(virtual_ip_text(number))


def gateway_address(subnet_number: int, gateway_index: int) -> IPv4Address:
    """Gateway g's WireGuard address inside agent subnet ``10.N.M.0/24``: ``10.N.M.g``."""
    return IPv4Address(gateway_address_text(subnet_number, gateway_index))


# The same as text, without building ipaddress objects: every config push renders one address
# per agent and gateway, and parsing them back dominated the cost of a fan-out.


def subnet_text(number: int) -> str:
    second, third = octets_of(number)
    return f"10.{second}.{third}.0/24"


def virtual_ip_text(number: int) -> str:
    second, third = octets_of(number)
    return f"10.{second}.{third}.{AGENT_HOST}"


def gateway_address_text(subnet_number: int, gateway_index: int) -> str:
    second, third = octets_of(subnet_number)
    if not GATEWAY_INDEX_FIRST <= gateway_index <= GATEWAY_INDEX_LAST:
        raise ValueError(
            f"gateway index must be {GATEWAY_INDEX_FIRST}-{GATEWAY_INDEX_LAST}, got {gateway_index}"
        )
    return f"10.{second}.{third}.{gateway_index}"


def subnet_number(subnet: str) -> int:
    """The number of a subnet written ``10.N.M.0/24`` (N in 1..254, M in 0..255)."""
    try:
        network = IPv4Network(subnet)
    except ValueError:
        raise ValueError(f"{subnet!r} is not an IPv4 network") from None
    octets = network.network_address.packed
    if network.prefixlen != 24 or octets[0] != 10:
        raise ValueError(f"{subnet!r} is not an agent subnet of the form 10.N.M.0/24")
    return number_for(octets[1], octets[2])


def _check_subnet_number(number: int) -> None:
    second, third = number % 256, number // 256
    if not (SUBNET_FIRST <= second <= SUBNET_LAST and 0 <= third < THIRD_OCTETS_MAX):
        raise ValueError(
            f"subnet number must stand for 10.N.M.0/24 with N in {SUBNET_FIRST}-{SUBNET_LAST} "
            f"and M in 0-{THIRD_OCTETS_MAX - 1}, got {number}"
        )


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
    """Which subnets may be handed out: ``10.N.M.0/24`` for N in ``first..last`` and M in
    ``0..third_octets-1``, minus those overlapping ``excluded``; iterated in (M, N) order."""

    first: int = SUBNET_FIRST
    last: int = SUBNET_LAST
    excluded: tuple[IPv4Network, ...] = ()
    third_octets: int = 1

    def __post_init__(self) -> None:
        if not SUBNET_FIRST <= self.first <= self.last <= SUBNET_LAST:
            raise ValueError(
                f"subnet pool must satisfy {SUBNET_FIRST} <= first <= last <= {SUBNET_LAST}, "
                f"got first={self.first} last={self.last}"
            )
        if not 1 <= self.third_octets <= THIRD_OCTETS_MAX:
            raise ValueError(
                f"third octets must be 1-{THIRD_OCTETS_MAX} (10.N.0.0/24 .. 10.N.255.0/24), "
                f"got {self.third_octets}"
            )

    @classmethod
    def parse(
        cls, first: int, last: int, excluded: Iterable[str] = (), third_octets: int = 1
    ) -> SubnetPool:
        networks = []
        for text in excluded:
            try:
                networks.append(IPv4Network(text, strict=False))
            except ValueError:
                raise ValueError(f"excluded range {text!r} is not an IPv4 CIDR") from None
        return cls(first=first, last=last, excluded=tuple(networks), third_octets=third_octets)

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int) or isinstance(number, bool):
            return False
        second, third = number % 256, number // 256
        if not (self.first <= second <= self.last and 0 <= third < self.third_octets):
            return False
        return not self._excluded(second, third)

    def _excluded(self, second: int, third: int) -> bool:
        start = (10 << 24) | (second << 16) | (third << 8)
        end = start | 0xFF
        return any(
            int(network.network_address) <= end and start <= int(network.broadcast_address)
            for network in self.excluded
        )

    def __iter__(self) -> Iterator[int]:
        return (
            third * 256 + second
            for third in range(self.third_octets)
            for second in range(self.first, self.last + 1)
            if not self._excluded(second, third)
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def describe(self) -> str:
        text = f"10.{self.first}.0.0/24-10.{self.last}.0.0/24"
        if self.third_octets > 1:
            text = f"10.N.M.0/24 for N in {self.first}-{self.last}, M in 0-{self.third_octets - 1}"
        if self.excluded:
            text += " excluding " + ", ".join(str(n) for n in self.excluded)
        return text


def lowest_free(candidates: Iterable[int], used: Iterable[int]) -> int | None:
    """The document's rule: the lowest candidate not in use."""
    taken = set(used)
    return next((n for n in candidates if n not in taken), None)


class NumberAllocator:
    """Hands out numbers from a fixed sequence to owners, the first free one in the sequence.

    Thread-safe, and idempotent per owner: asking again for the same owner returns its number,
    so a reconcile that runs twice (or two that race) never takes two numbers. The free
    positions of the sequence sit in a heap, so a pool of 65,000 costs no more per allocation
    than one of 254.
    """

    def __init__(
        self,
        candidates: Iterable[int],
        what: str,
        hint: str = "",
        label: Callable[[int], str] = str,
    ) -> None:
        self._label = label
        self._candidates = tuple(candidates)
        self._position = {number: i for i, number in enumerate(self._candidates)}
        self._free = list(range(len(self._candidates)))  # ascending: already a heap
        self._in_heap = set(self._free)
        self._what = what
        self._hint = hint
        self._lock = threading.Lock()
        self._by_owner: dict[Hashable, int] = {}
        self._by_number: dict[int, Hashable] = {}

    def allocate(self, owner: Hashable) -> int:
        with self._lock:
            if owner in self._by_owner:
                return self._by_owner[owner]
            while self._free:
                position = heapq.heappop(self._free)
                self._in_heap.discard(position)
                number = self._candidates[position]
                if number not in self._by_number:  # else restored meanwhile: drop it
                    self._take(owner, number)
                    return number
            raise PoolExhausted(
                f"no free {self._what}: all {len(self._candidates)} are allocated{self._hint}"
            )

    def restore(self, owner: Hashable, number: int) -> None:
        """Record an allocation made earlier (read back from status after a restart)."""
        with self._lock:
            holder = self._by_number.get(number)
            if holder is not None and holder != owner:
                raise AllocationConflict(number, holder, self._label(number))
            previous = self._by_owner.get(owner)
            if previous is not None and previous != number:
                self._free_number(previous)
            self._take(owner, number)

    def release(self, owner: Hashable) -> int | None:
        with self._lock:
            number = self._by_owner.pop(owner, None)
            if number is not None:
                self._free_number(number)
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

    def _free_number(self, number: int) -> None:
        del self._by_number[number]
        position = self._position.get(number)  # None: outside the pool (kept, not reused)
        if position is not None and position not in self._in_heap:
            heapq.heappush(self._free, position)
            self._in_heap.add(position)


class SubnetAllocator:
    """Agent subnets from a :class:`SubnetPool`."""

    def __init__(self, pool: SubnetPool | None = None) -> None:
        self.pool = pool or SubnetPool()
        hint = (
            " (enlarge the pool with --subnet-third-octets)"
            if self.pool.third_octets < THIRD_OCTETS_MAX
            else ""
        )
        self._numbers = NumberAllocator(
            self.pool,
            f"agent subnet in {self.pool.describe()}",
            hint,
            label=lambda number: str(subnet_for(number)),
        )

    def allocate(self, owner: Hashable) -> AgentAddresses:
        return AgentAddresses.of(self._numbers.allocate(owner))

    def restore(self, owner: Hashable, subnet: str) -> AgentAddresses:
        """Re-register ``owner``'s subnet from status. A subnet outside the current pool is kept:
        narrowing the pool must not renumber agents that already have addresses."""
        number = subnet_number(subnet)
        self._numbers.restore(owner, number)
        return AgentAddresses.of(number)

    def release(self, owner: Hashable) -> int | None:
        """Free ``owner``'s subnet; returns its number, None when it held none."""
        return self._numbers.release(owner)

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
