"""Subnet allocation: the document's rule, exhaustion, reuse, exclusions and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network

import pytest

from kakuremichi.control.addressing import (
    AgentAddresses,
    AllocationConflict,
    GatewayIndexAllocator,
    PoolExhausted,
    SubnetAllocator,
    SubnetPool,
    gateway_address,
    lowest_free,
    number_for,
    octets_of,
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
    "bad", ["10.1.0.0/16", "192.168.1.0/24", "10.0.0.0/24", "10.255.3.0/24", "10.1.1.0/25", "x"]
)
def test_subnet_number_refuses_foreign_subnets(bad: str) -> None:
    with pytest.raises(ValueError, match=r"10\.N\.M\.0/24|not an IPv4|subnet number"):
        subnet_number(bad)


def test_subnet_numbers_name_every_enlarged_subnet_in_allocation_order() -> None:
    assert subnet_number("10.7.0.0/24") == number_for(7) == 7  # the document's numbers, unchanged
    assert subnet_number("10.1.1.0/24") == number_for(1, 1) == 257
    assert subnet_number("10.254.255.0/24") == number_for(254, 255)
    assert octets_of(number_for(9, 3)) == (9, 3)
    assert AgentAddresses.of(number_for(9, 3)) == AgentAddresses(
        number=3 * 256 + 9, subnet=IPv4Network("10.9.3.0/24"), virtual_ip=IPv4Address("10.9.3.100")
    )
    assert number_for(254, 0) < number_for(1, 1)  # every 10.N.0.0/24 comes before 10.1.1.0/24
    with pytest.raises(ValueError, match="subnet number"):
        number_for(255, 0)
    with pytest.raises(ValueError, match="subnet number"):
        number_for(1, 256)


def test_enlarged_pool_keeps_the_documents_plan_first_then_goes_by_third_octet() -> None:
    allocator = SubnetAllocator(SubnetPool(third_octets=3))
    subnets = [str(allocator.allocate(n).subnet) for n in range(254 * 3)]
    assert subnets[:254] == [f"10.{n}.0.0/24" for n in range(1, 255)]
    assert subnets[254:257] == ["10.1.1.0/24", "10.2.1.0/24", "10.3.1.0/24"]
    assert subnets[508:510] == ["10.1.2.0/24", "10.2.2.0/24"]
    assert subnets[-1] == "10.254.2.0/24"
    assert len(set(subnets)) == 254 * 3
    with pytest.raises(
        PoolExhausted,
        match=r"no free agent subnet in 10\.N\.M\.0/24 for N in 1-254, M in 0-2: "
        r"all 762 are allocated \(enlarge the pool with --subnet-third-octets\)",
    ):
        allocator.allocate("one-too-many")
    # A freed subnet of the first plane goes before any free one of a later plane.
    allocator.release(300)
    allocator.release(5)
    assert allocator.allocate("next").subnet == IPv4Network("10.6.0.0/24")
    assert allocator.allocate("then").subnet == IPv4Network("10.47.1.0/24")


def test_enlarging_the_pool_moves_nobody() -> None:
    small, large = SubnetAllocator(), SubnetAllocator(SubnetPool(third_octets=4))
    assert [small.allocate(n).subnet for n in range(254)] == [
        large.allocate(n).subnet for n in range(254)
    ]
    with pytest.raises(PoolExhausted, match="enlarge the pool"):
        small.allocate("more")
    assert large.allocate("more").subnet == IPv4Network("10.1.1.0/24")


def test_gateway_addresses_follow_the_third_octet() -> None:
    assert gateway_address(number_for(3, 2), 7) == IPv4Address("10.3.2.7")
    assert gateway_address(number_for(3, 2), 7) in IPv4Network("10.3.2.0/24")


def test_exclusions_apply_to_every_candidate_subnet() -> None:
    pool = SubnetPool.parse(1, 254, ["10.96.0.0/12", "10.5.1.0/24", "10.7.2.128/25"], 3)
    numbers = set(pool)
    assert number_for(5, 0) in numbers and number_for(5, 2) in numbers
    assert number_for(5, 1) not in numbers
    assert number_for(7, 2) not in numbers  # a partial overlap excludes the whole /24
    assert not any(96 <= n % 256 <= 111 for n in numbers)  # on every plane
    assert len(pool) == (254 - 16) * 3 - 2
    assert list(pool) == sorted(numbers)  # (M, N) order
    allocator = SubnetAllocator(pool)
    subnets = {str(allocator.allocate(n).subnet) for n in range(len(pool))}
    assert "10.5.1.0/24" not in subnets and "10.100.2.0/24" not in subnets
    assert "excluding 10.96.0.0/12, 10.5.1.0/24" in pool.describe()


def test_third_octets_must_be_1_to_256() -> None:
    for bad in (0, 257):
        with pytest.raises(ValueError, match="third octets must be 1-256"):
            SubnetPool(third_octets=bad)
    whole = SubnetPool(third_octets=256)
    assert len(whole) == 254 * 256
    allocator = SubnetAllocator(whole)
    for n in range(len(whole)):
        allocator.allocate(n)
    with pytest.raises(PoolExhausted, match=r"all 65024 are allocated$"):  # no larger pool
        allocator.allocate("extra")


def test_restore_accepts_enlarged_subnets_inside_or_outside_the_pool() -> None:
    allocator = SubnetAllocator(SubnetPool(third_octets=2))
    assert allocator.restore("b", "10.1.1.0/24").number == number_for(1, 1)
    for n in range(254):
        allocator.allocate(n)
    assert allocator.allocate("next").subnet == IPv4Network("10.2.1.0/24")  # 10.1.1 is taken
    with pytest.raises(AllocationConflict, match=r"10\.1\.1\.0/24 is already allocated to b"):
        allocator.restore("c", "10.1.1.0/24")
    # After narrowing back to the document's plan the enlarged subnets are kept, not reused.
    narrow = SubnetAllocator()
    assert narrow.restore("old", "10.9.7.0/24").virtual_ip == IPv4Address("10.9.7.100")
    assert narrow.holder_of("10.9.7.0/24") == "old"
    narrow.release("old")
    assert narrow.allocate("new").subnet == IPv4Network("10.1.0.0/24")


def test_restore_moves_an_owner_and_frees_its_old_subnet_once() -> None:
    allocator = SubnetAllocator(SubnetPool(first=1, last=3))
    allocator.allocate("a")  # 10.1
    allocator.restore("a", "10.3.0.0/24")  # status said otherwise: 10.1 is free again
    allocator.release("a")
    assert [allocator.allocate(o).number for o in "xyz"] == [1, 2, 3]
    with pytest.raises(PoolExhausted):
        allocator.allocate("w")


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
