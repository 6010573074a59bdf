"""A WireGuard interface driven from :class:`~kakuremichi.wireguard_plan.InterfacePlan`s.

Userspace: start and supervise ``wireguard-go`` and configure it through its UAPI socket
(``/var/run/wireguard/<name>.sock``), addresses and link state through netlink (pyroute2). Each
change is applied incrementally (:func:`~kakuremichi.wireguard_plan.uapi_set`), so peers that did
not change keep their sessions. The kernel path (netlink genl) comes with the edge commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from kakuremichi.wireguard_plan import InterfacePlan, address_changes, uapi_set

UAPI_DIR = Path("/var/run/wireguard")
START_TIMEOUT_SECONDS = 10.0
log = logging.getLogger(__name__)


class WireGuardError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerState:
    public_key_hex: str
    last_handshake_seconds: int
    rx_bytes: int
    tx_bytes: int


class UserspaceWireGuard:
    def __init__(self, name: str, uapi_dir: Path = UAPI_DIR) -> None:
        self.name = name
        self.socket_path = uapi_dir / f"{name}.sock"
        self.process: asyncio.subprocess.Process | None = None
        self.current: InterfacePlan | None = None

    async def start(self) -> None:
        binary = shutil.which("wireguard-go")
        if binary is None:
            raise WireGuardError("wireguard-go is not installed")
        self.process = await asyncio.create_subprocess_exec(binary, "-f", self.name)
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                while not self.socket_path.exists():
                    if self.process.returncode is not None:
                        raise WireGuardError(f"wireguard-go exited with {self.process.returncode}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise WireGuardError(f"no UAPI socket at {self.socket_path}") from None
        await asyncio.to_thread(self._link_up)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def apply(self, plan: InterfacePlan) -> None:
        """Make the interface match ``plan``, touching only what differs."""
        response = await self._uapi(uapi_set(plan, self.current))
        if "errno=0" not in response:
            raise WireGuardError(f"wireguard-go refused the configuration: {response.strip()}")
        added, removed = address_changes(plan, self.current)
        await asyncio.to_thread(self._addresses, added, removed)
        self.current = plan

    async def peers(self) -> list[PeerState]:
        response = await self._uapi("get=1\n\n")
        peers: list[PeerState] = []
        fields: dict[str, str] = {}
        for line in response.splitlines():
            key, _, value = line.partition("=")
            if key == "public_key":
                if fields:
                    peers.append(_peer(fields))
                fields = {}
            if key in ("public_key", "last_handshake_time_sec", "rx_bytes", "tx_bytes"):
                fields[key] = value
        if fields:
            peers.append(_peer(fields))
        return peers

    async def _uapi(self, request: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(request.encode())
            await writer.drain()
            chunks = []
            while True:
                line = await reader.readline()
                if not line or line == b"\n":
                    break
                chunks.append(line.decode())
            return "".join(chunks)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _index(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if not found:
            raise WireGuardError(f"interface {self.name} does not exist")
        return int(found[0])

    def _link_up(self) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=self._index(ipr), state="up")

    def _addresses(self, added: list[str], removed: list[str]) -> None:
        with IPRoute() as ipr:
            index = self._index(ipr)
            for cidr in removed:
                address, prefix = cidr.split("/")
                with contextlib.suppress(Exception):
                    ipr.addr("del", index=index, address=address, prefixlen=int(prefix))
            for cidr in added:
                address, prefix = cidr.split("/")
                ipr.addr("add", index=index, address=address, prefixlen=int(prefix))


def _peer(fields: dict[str, str]) -> PeerState:
    return PeerState(
        public_key_hex=fields["public_key"],
        last_handshake_seconds=int(fields.get("last_handshake_time_sec", "0")),
        rx_bytes=int(fields.get("rx_bytes", "0")),
        tx_bytes=int(fields.get("tx_bytes", "0")),
    )
