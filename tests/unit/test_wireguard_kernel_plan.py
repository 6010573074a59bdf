"""The kernel WireGuard path without a kernel: the same incremental changes as the UAPI path,
peers in the shape pyroute2 encodes, dumps parsed back into peer states, and the driver choice
falling back to wireguard-go."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, ClassVar

import pytest
from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.edge import wireguard
from kakuremichi.edge.wireguard import (
    KernelWireGuard,
    PeerState,
    UserspaceWireGuard,
    WireGuardUnavailable,
    kernel_peer_states,
    open_wireguard,
)
from kakuremichi.edge.wireguard_plan import (
    InterfacePlan,
    Peer,
    PlanChanges,
    netlink_peer,
    plan_changes,
    split_endpoint,
)

KEY, GW1, GW2, GW3 = (generate_wireguard_keypair() for _ in range(4))
PEER1 = Peer(GW1.public_key, ("10.3.0.1/32",), "203.0.113.1:51820", 25)
PEER2 = Peer(GW2.public_key, ("10.3.0.2/32",), "203.0.113.2:51820", 25)
PEER3 = Peer(GW3.public_key, ("10.3.0.3/32",))


def plan(*peers: Peer, port: int | None = None, key: str = KEY.private_key) -> InterfacePlan:
    return InterfacePlan(key, ("10.3.0.100/24",), peers, port)


def hex_of(key: str) -> str:
    return base64.b64decode(key).hex()


def test_fresh_interface_changes_everything() -> None:
    changes = plan_changes(plan(PEER2, PEER1, port=51820))
    assert changes.private_key == KEY.private_key
    assert changes.listen_port == 51820
    assert changes.removed == ()
    assert set(changes.changed) == {PEER1, PEER2}


def test_changes_leave_unchanged_peers_and_settings_alone() -> None:
    before = plan(PEER1, PEER2, port=51820)
    moved = Peer(GW2.public_key, ("10.3.0.2/32",), "203.0.113.9:51820", 25)
    changes = plan_changes(plan(PEER1, moved, PEER3, port=51820), before)
    assert (changes.private_key, changes.listen_port, changes.removed) == (None, None, ())
    assert set(changes.changed) == {moved, PEER3}  # PEER1 untouched: its session goes on
    dropped = plan_changes(plan(PEER1, port=51821), before)
    assert (dropped.listen_port, dropped.removed, dropped.changed) == (51821, (GW2.public_key,), ())
    assert plan_changes(plan(PEER2, PEER1, port=51820), before) == PlanChanges(None, None, (), ())


def test_netlink_peer_matches_the_uapi_fields() -> None:
    assert netlink_peer(PEER1) == {
        "public_key": GW1.public_key,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.3.0.1/32"],
        "endpoint_addr": "203.0.113.1",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
    }
    assert netlink_peer(PEER3) == {
        "public_key": GW3.public_key,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.3.0.3/32"],
    }


def test_split_endpoint() -> None:
    assert split_endpoint("203.0.113.1:51820") == ("203.0.113.1", 51820)
    assert split_endpoint("[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    for bad in ("203.0.113.1", ":51820", "203.0.113.1:port"):
        with pytest.raises(ValueError, match="not address:port"):
            split_endpoint(bad)


def test_pyroute2_encodes_netlink_peers() -> None:
    """What the kernel would receive, built by pyroute2's own encoder (it needs no socket)."""
    msg = wgmsg()
    msg["cmd"], msg["version"] = 1, 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    encoder: Any = object.__new__(AsyncWireGuard)
    encoder._wg_set_peer(msg, netlink_peer(PEER1))
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    (peer,) = decoded.get_attr("WGDEVICE_A_PEERS")
    assert base64.b64decode(peer.get_attr("WGPEER_A_PUBLIC_KEY")).hex() == hex_of(GW1.public_key)
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ("203.0.113.1", 51820)
    assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert peer.get_attr("WGPEER_A_FLAGS") == 0x2  # WGPEER_F_REPLACE_ALLOWEDIPS
    (allowed,) = peer.get_attr("WGPEER_A_ALLOWEDIPS")
    assert allowed["addr"] == "10.3.0.1/32"


def dump(*peers: list[tuple[str, Any]]) -> wgmsg:
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_kernel_peer_states_merge_split_dumps() -> None:
    first = dump(
        [("WGPEER_A_PUBLIC_KEY", GW1.public_key),
         ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1_700_000_000, "tv_nsec": 5}),
         ("WGPEER_A_RX_BYTES", 123), ("WGPEER_A_TX_BYTES", 456)],
        [("WGPEER_A_PUBLIC_KEY", GW2.public_key),
         ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}),
         ("WGPEER_A_RX_BYTES", 0), ("WGPEER_A_TX_BYTES", 0)],
    )  # fmt: skip
    # The kernel continues GW2's allowed IPs in a second message: key (and IPs) only.
    second = dump([("WGPEER_A_PUBLIC_KEY", GW2.public_key)])
    assert kernel_peer_states([first, second]) == [
        PeerState(hex_of(GW1.public_key), 1_700_000_000, 123, 456),
        PeerState(hex_of(GW2.public_key), 0, 0, 0),
    ]


class FakeWireGuard:
    """Stands in for pyroute2's ``WireGuard``, recording each ``set``."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __enter__(self) -> FakeWireGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set(self, interface: str, **kwargs: Any) -> None:
        self.calls.append({"interface": interface, **kwargs})


def test_kernel_driver_sends_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    addresses: list[tuple[list[str], list[str]]] = []
    monkeypatch.setattr(FakeWireGuard, "calls", calls)
    monkeypatch.setattr(wireguard, "WireGuard", FakeWireGuard)
    monkeypatch.setattr(
        KernelWireGuard, "_addresses", lambda self, add, rm: addresses.append((add, rm))
    )
    driver = KernelWireGuard("wgtest")

    async def scenario() -> None:
        await driver.apply(plan(PEER1, PEER2, port=51820))
        calls.clear()
        await driver.apply(plan(PEER1, PEER3, port=51820))

    asyncio.run(scenario())
    assert calls == [
        {"interface": "wgtest", "peer": {"public_key": GW2.public_key, "remove": True}},
        {"interface": "wgtest", "peer": netlink_peer(PEER3)},
    ]
    assert addresses == [(["10.3.0.100/24"], []), ([], [])]
    assert driver.current == plan(PEER1, PEER3, port=51820)


def test_auto_falls_back_to_userspace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(wireguard, "kernel_wireguard_available", lambda: "no module")
    with caplog.at_level(logging.INFO, logger=wireguard.__name__):
        chosen = open_wireguard("wgx", "auto")
    assert isinstance(chosen, UserspaceWireGuard)
    assert chosen.mode == "userspace"
    assert "WireGuard: userspace wireguard-go (kernel: no module)" in caplog.messages
    with pytest.raises(WireGuardUnavailable, match="no module"):
        open_wireguard("wgx", "kernel")


def test_auto_prefers_the_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(wireguard, "kernel_wireguard_available", lambda: None)
    with caplog.at_level(logging.INFO, logger=wireguard.__name__):
        chosen = open_wireguard("wgx")
    assert isinstance(chosen, KernelWireGuard)
    assert (chosen.mode, chosen.name) == ("kernel", "wgx")
    assert "WireGuard: kernel" in caplog.messages
    assert isinstance(open_wireguard("wgx", "userspace"), UserspaceWireGuard)
