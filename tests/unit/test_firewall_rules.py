"""The packet filter each edge puts on its WireGuard interface, as text (applied with nft in
``tests/integration/test_firewall.py``)."""

from __future__ import annotations

import pytest

from kakuremichi.edge.firewall_rules import (
    gateways_update,
    interface_name,
    removal,
    ruleset,
    table_name,
)


def test_a_gateway_takes_nothing_new_from_its_wireguard_interface() -> None:
    text = ruleset("gateway", "kmgateway0", 8471)
    table = "kakuremichi_kmgateway0"
    assert text.startswith(f"table inet {table} {{}}\ndelete table inet {table}\n")
    input_chain = text[text.index("chain input") : text.index("chain forward")]
    assert 'iifname "kmgateway0" ct state established,related accept' in input_chain
    assert input_chain.rstrip().splitlines()[-2].strip() == 'iifname "kmgateway0" counter drop'
    # new from the interface: UDP Tunnels' frames, relay port to relay port, and nothing else
    assert [line.strip() for line in input_chain.splitlines() if "dport" in line] == [
        'iifname "kmgateway0" udp sport 8471 udp dport 8471 accept'
    ]
    assert "tcp dport" not in text and "@gateways" not in text
    forward = text[text.index("chain forward") :]
    assert 'iifname "kmgateway0" counter drop' in forward
    assert "policy accept" in forward  # what does not come from the interface is the host's


def test_an_agent_takes_only_the_relay_port_from_its_gateways() -> None:
    text = ruleset("agent", "kmagent0", 8471, ["10.1.0.2", "10.1.0.1", "10.1.0.1"])
    assert "set gateways { type ipv4_addr; elements = { 10.1.0.1, 10.1.0.2 }; }" in text
    assert 'iifname "kmagent0" ip saddr @gateways tcp dport 8471 ct state new accept' in text
    assert 'iifname "kmagent0" ip saddr @gateways udp sport 8471 udp dport 8471 accept' in text
    assert "elements" not in ruleset("agent", "kmagent0", 8471)
    assert gateways_update("kmagent0", ["10.1.0.3"]) == (
        "flush set inet kakuremichi_kmagent0 gateways\n"
        "add element inet kakuremichi_kmagent0 gateways { 10.1.0.3 }\n"
    )
    assert gateways_update("kmagent0", []) == "flush set inet kakuremichi_kmagent0 gateways\n"


def test_each_interface_has_a_table_of_its_own() -> None:
    assert table_name("kmagent-2") == "kakuremichi_kmagent_2"
    assert removal("kmagent0").endswith("delete table inet kakuremichi_kmagent0\n")


@pytest.mark.parametrize("name", ["wg0", "eth0", "km", "kmAgent", "km_agent", "kmagent0123456789"])
def test_edges_create_only_interfaces_of_their_prefix(name: str) -> None:
    with pytest.raises(ValueError, match="'km' followed by"):
        interface_name(name)
    assert interface_name("kmagent0") == "kmagent0"
