"""The edge's packet filter on its WireGuard interface (rules: :mod:`firewall_rules`), applied
with the ``nft`` tool from Debian's ``nftables``: installed when the edge starts (replacing what
a killed run left), kept current (an agent's gateway addresses), removed when it stops.
``--no-firewall`` runs without it, knowingly."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Iterable

from kakuremichi.edge import firewall_rules
from kakuremichi.edge.firewall_rules import Role

NFT_TIMEOUT = 10.0
log = logging.getLogger(__name__)


class FirewallError(Exception):
    """The rules cannot be installed: the edge does not start (one line says why)."""


def _nft(ruleset: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise FirewallError(
            "cannot install the packet filter on the WireGuard interface: nft is not installed "
            "(Debian/Ubuntu: apt-get install nftables); --no-firewall runs without it"
        )
    try:
        done = subprocess.run(  # noqa: S603 - nft from PATH, our own ruleset on stdin
            [nft, "-f", "-"], input=ruleset, capture_output=True, text=True, check=False,
            timeout=NFT_TIMEOUT,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FirewallError(f"cannot install the packet filter: nft: {error}") from None
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split())[:300] or f"exit {done.returncode}"
        raise FirewallError(
            f"cannot install the packet filter on the WireGuard interface: nft: {why} "
            "(it needs CAP_NET_ADMIN and nftables in the kernel); --no-firewall runs without it"
        )


class PacketFilter:
    """One edge's table. With ``enabled=False`` every call does nothing (``--no-firewall``)."""

    def __init__(self, role: Role, interface: str, relay_port: int, enabled: bool = True) -> None:
        self.role = role
        self.interface = interface
        self.relay_port = relay_port
        self.enabled = enabled
        self.installed = False
        self.gateways: frozenset[str] = frozenset()

    async def install(self) -> None:
        if not self.enabled:
            log.warning("running without a packet filter on %s (--no-firewall)", self.interface)
            return
        text = firewall_rules.ruleset(self.role, self.interface, self.relay_port, self.gateways)
        await asyncio.to_thread(_nft, text)
        self.installed = True
        log.info(
            "packet filter on %s (nftables table inet %s)",
            self.interface, firewall_rules.table_name(self.interface),
        )  # fmt: skip

    async def set_gateways(self, addresses: Iterable[str]) -> None:
        """The gateway addresses an agent accepts relay connections from."""
        wanted = frozenset(addresses)
        if not self.enabled or wanted == self.gateways:
            return
        if self.installed:
            await asyncio.to_thread(_nft, firewall_rules.gateways_update(self.interface, wanted))
        self.gateways = wanted

    async def remove(self) -> None:
        if not self.installed:
            return
        try:
            await asyncio.to_thread(_nft, firewall_rules.removal(self.interface))
        except FirewallError as error:
            log.warning("%s", error)
        self.installed = False
