"""The packet filter an edge puts on its own WireGuard interface, as nftables rulesets (pure).

Each edge owns one table, named after its interface, in the ``inet`` family: the host's own
tables and rules are never touched, and two edges on one host (one table each) never meet. Base
chains hook input and forward at a priority just before the usual filter chains, with policy
accept: a packet that does not come from the edge's interface passes through to whatever the
host has; one that does is judged here, and a drop here is final.

- **Gateway**: nothing new may arrive from the WireGuard interface. Replies to the gateway's own
  connections (to agents' relays) pass, as does ICMP related to them (fragmentation needed, so
  path MTU discovery works), and UDP Tunnels' frames from relay port to relay port (the
  gateway's UDP relay socket takes an answer only for a flow it opened toward its sender);
  nothing is forwarded from the interface to anywhere (an agent's key must not open the gateway
  node's listeners, pods or Services behind it).
- **Agent**: only new TCP connections to the relay port, and UDP frames from relay port to relay
  port, from the gateways of its current config; nothing forwarded.

The ruleset replaces the edge's table atomically (``nft -f`` runs a file as one transaction),
whatever a previous run killed without cleaning up left behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

Role = Literal["gateway", "agent"]
INTERFACE_PREFIX = "km"
"""Every interface an edge creates is named ``km…``: the rules match only it."""
_INTERFACE = re.compile(r"^km[a-z0-9-]{1,13}$")
PRIORITY = "filter - 10"


def interface_name(value: str) -> str:
    """A WireGuard interface name an edge may create: ``km`` then 1-13 of ``[a-z0-9-]``."""
    if not _INTERFACE.match(value):
        raise ValueError(
            f"{value!r} is not an edge interface name: 'km' followed by 1-13 lower-case letters, "
            "digits or '-' (e.g. kmagent0), so that the edge's packet filter matches only it"
        )
    return value


def table_name(interface: str) -> str:
    return "kakuremichi_" + interface.replace("-", "_")


def _elements(addresses: Iterable[str]) -> str:
    listed = sorted(set(addresses))
    return " elements = { " + ", ".join(listed) + " };" if listed else ""


def ruleset(role: Role, interface: str, relay_port: int, gateways: Iterable[str] = ()) -> str:
    """The edge's whole table, replacing any earlier one."""
    table = table_name(interface)
    wg = f'iifname "{interface}"'
    lines = [
        f"table inet {table} {{}}",  # (so that the delete below always has a table to delete)
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    if role == "agent":
        lines.append(f"  set gateways {{ type ipv4_addr;{_elements(gateways)} }}")
    lines += [
        "  chain input {",
        f"    type filter hook input priority {PRIORITY}; policy accept;",
        f"    {wg} ct state established,related accept",
    ]
    if role == "agent":
        lines.append(f"    {wg} ip saddr @gateways tcp dport {relay_port} ct state new accept")
        lines.append(
            f"    {wg} ip saddr @gateways udp sport {relay_port} udp dport {relay_port} accept"
        )
    else:  # UDP Tunnels' answers (the gateway checks each belongs to a flow it opened there)
        lines.append(f"    {wg} udp sport {relay_port} udp dport {relay_port} accept")
    lines += [
        f"    {wg} counter drop",
        "  }",
        "  chain forward {",
        f"    type filter hook forward priority {PRIORITY}; policy accept;",
        f"    {wg} counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def gateways_update(interface: str, gateways: Iterable[str]) -> str:
    """An agent's set of gateway addresses, replaced in one transaction."""
    table = table_name(interface)
    listed = sorted(set(gateways))
    lines = [f"flush set inet {table} gateways"]
    if listed:
        lines.append(f"add element inet {table} gateways {{ {', '.join(listed)} }}")
    return "\n".join(lines) + "\n"


def removal(interface: str) -> str:
    table = table_name(interface)
    return f"table inet {table} {{}}\ndelete table inet {table}\n"
