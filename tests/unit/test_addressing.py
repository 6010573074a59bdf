"""Subnet allocation: the document's rule, exhaustion, reuse, exclusions and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network

import pytest

from kakuremichi.addressing import (
    AgentAddresses,
    AllocationConflict,
    GatewayIndexAllocator,
    PoolExhausted,
    SubnetAllocator,
    SubnetPool,
    gateway_address,
    lowest_free,
    subnet_number,
)


def test_first_agent_gets_the_documents_first_subnet() -> None:
    addresses = SubnetAllocator().allocate("home-server")
    assert addresses == AgentAddresses(
        number=1, subnet=IPv4Network("10.1.0.0/24"), virtual_ip=IPv4Address("10.1.0.100")
    )


def test_lowest_free_number_is_taken() -> None:
    assert lowest_free(range(1, 255), [1, 2, 4]) == 3
    assert lowest_free(range(1, 255), []) == 1
    assert lowest_free(range(1, 3), [1, 2]) is None


def test_allocation_is_idempotent_per_owner() -> None:
    allocator = SubnetAllocator()
    first = allocator.allocate("a")
    assert allocator.allocate("a") == first
    assert allocator.allocate("b").number == 2


def test_released_subnet_is_reused() -> None:
    allocator = SubnetAllocator()
    for owner in "abc":
        allocator.allocate(owner)
    allocator.release("b")
    assert allocator.allocate("d").subnet == IPv4Network("10.2.0.0/24")
    assert allocator.allocate("e").number == 4


def test_exhaustion_is_a_clear_error_and_changes_nothing() -> None:
    allocator = SubnetAllocator(SubnetPool(first=1, last=254))
    for n in range(254):
        allocator.allocate(n)
    with pytest.raises(PoolExhausted, match=r"no free agent subnet .* all 254 are allocated"):
        allocator.allocate("one-too-many")
    assert allocator.holder_of("10.254.0.0/24") == 253
    allocator.release(7)
    assert allocator.allocate("one-too-many").number == 8


def test_excluded_ranges_are_skipped() -> None:
    pool = SubnetPool.parse(1, 254, ["10.96.0.0/12", "10.244.0.0/16", "10.1.0.0/24"])
    numbers = list(pool)
    assert 1 not in numbers and 244 not in numbers
    assert not any(96 <= n <= 111 for n in numbers)
    assert len(pool) == 254 - 1 - 16 - 1
    assert SubnetAllocator(pool).allocate("a").number == 2
    assert "excluding 10.96.0.0/12" in pool.describe()


def test_pool_configuration_errors() -> None:
    with pytest.raises(ValueError, match="first <= last"):
        SubnetPool(first=10, last=5)
    with pytest.raises(ValueError, match="first <= last"):
        SubnetPool(first=0, last=254)
    with pytest.raises(ValueError, match="not an IPv4 CIDR"):
        SubnetPool.parse(1, 254, ["nonsense"])


def test_restore_after_restart_keeps_addresses_and_detects_conflicts() -> None:
    allocator = SubnetAllocator()
    assert allocator.restore("b", "10.5.0.0/24").number == 5
    assert allocator.allocate("a").number == 1
    assert allocator.restore("b", "10.5.0.0/24").number == 5  # idempotent
    with pytest.raises(AllocationConflict) as conflict:
        allocator.restore("c", "10.5.0.0/24")
    assert conflict.value.holder == "b"
    # A subnet outside a narrowed pool is still honoured: agents are never renumbered.
    narrow = SubnetAllocator(SubnetPool(first=1, last=10))
    assert narrow.restore("old", "10.200.0.0/24").number == 200


def test_concurrent_requests_never_share_a_subnet() -> None:
    allocator = SubnetAllocator()
    barrier = threading.Barrier(16)

    def claim(owner: int) -> int:
        barrier.wait()
        return allocator.allocate(owner).number

    with ThreadPoolExecutor(max_workers=16) as pool:
        numbers = list(pool.map(claim, range(192)))  # 12 rounds of 16 at once
    assert sorted(numbers) == list(range(1, 193))


def test_concurrent_requests_for_one_owner_get_one_subnet() -> None:
    allocator = SubnetAllocator()
    with ThreadPoolExecutor(max_workers=8) as pool:
        numbers = set(pool.map(lambda _: allocator.allocate("same").number, range(64)))
    assert numbers == {1}
    assert allocator.allocate("other").number == 2


@pytest.mark.parametrize(
    "bad", ["10.1.0.0/16", "192.168.1.0/24", "10.1.1.0/24", "10.0.0.0/24", "x"]
)
def test_subnet_number_refuses_foreign_subnets(bad: str) -> None:
    with pytest.raises(ValueError, match=r"10\.N\.0\.0/24|not an IPv4|subnet number"):
        subnet_number(bad)


def test_gateway_addresses_sit_inside_each_agent_subnet() -> None:
    gateways = GatewayIndexAllocator()
    first, second = gateways.allocate("gw-a"), gateways.allocate("gw-b")
    assert (first, second) == (1, 2)
    assert gateway_address(3, second) == IPv4Address("10.3.0.2")
    assert gateway_address(3, second) in IPv4Network("10.3.0.0/24")
    with pytest.raises(ValueError, match="gateway index"):
        gateway_address(3, 100)  # .100 is the agent's own address


def test_gateway_indexes_run_out_after_99() -> None:
    gateways = GatewayIndexAllocator()
    for n in range(99):
        gateways.allocate(n)
    with pytest.raises(PoolExhausted, match="gateway index"):
        gateways.allocate("extra")
