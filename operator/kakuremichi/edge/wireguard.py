"""A WireGuard interface driven from :class:`~kakuremichi.edge.wireguard_plan.InterfacePlan`s.

Two drivers with one interface (:class:`WireGuardInterface`); :func:`open_wireguard` picks one.

- :class:`KernelWireGuard`: a ``wireguard`` link created by rtnetlink and configured through the
  kernel's WireGuard generic netlink family (pyroute2 ``WireGuard``).
- :class:`UserspaceWireGuard`: ``wireguard-go`` started and supervised here, configured through
  its UAPI socket (``/var/run/wireguard/<name>.sock``), for kernels without WireGuard.

Either way addresses and link state go through rtnetlink (pyroute2 ``IPRoute``), and each change
is applied incrementally (:func:`~kakuremichi.edge.wireguard_plan.plan_changes`), so peers that did
not change keep their sessions. Blocking netlink calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from kakuremichi.api.protocol import NO_WIREGUARD
from kakuremichi.edge.wireguard_plan import (
    InterfacePlan,
    PlanChanges,
    address_changes,
    netlink_peer,
    plan_changes,
    uapi_set,
)

UAPI_DIR = Path("/var/run/wireguard")
PR_SET_PDEATHSIG = 1
START_TIMEOUT_SECONDS = 10.0
log = logging.getLogger(__name__)

WireGuardMode = Literal["kernel", "userspace"]


def find_wireguard_go() -> str | None:
    """``wireguard-go`` on the PATH, else the one the installer put beside this installation
    (``/opt/kakuremichi/bin``, the virtualenv being ``/opt/kakuremichi/venv``)."""
    found = shutil.which("wireguard-go")
    if found is not None:
        return found
    beside = Path(sys.prefix).parent / "bin" / "wireguard-go"
    return str(beside) if os.access(beside, os.X_OK) else None


class WireGuardUnavailable(RuntimeError):
    """This host has no WireGuard the edge can use: the edge does not start (one line says
    what is missing and how to get it)."""


class WireGuardError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerState:
    public_key_hex: str
    last_handshake_seconds: int
    """Unix time of the latest handshake; 0 if there has been none."""
    rx_bytes: int
    tx_bytes: int


class WireGuardInterface(Protocol):
    """What the edge needs of a WireGuard interface, whichever driver runs it."""

    @property
    def name(self) -> str: ...

    @property
    def mode(self) -> WireGuardMode: ...

    current: InterfacePlan | None
    """The plan last applied in full; None before the first."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def apply(self, plan: InterfacePlan) -> None: ...

    async def peers(self) -> list[PeerState]: ...

    def alive(self) -> bool:
        """False once the interface is gone (its wireguard-go died, or someone deleted it)."""
        ...


class _Link:
    """Link state and addresses by rtnetlink, the same for both drivers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: InterfacePlan | None = None

    async def _apply_addresses(self, plan: InterfacePlan) -> None:
        added, removed = address_changes(plan, self.current)
        await asyncio.to_thread(self._addresses, added, removed)

    def alive(self) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.name))

    def _delete_stale_link(self) -> None:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=index)

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
                with contextlib.suppress(Exception):  # already gone is as good as removed
                    ipr.addr("del", index=index, address=address, prefixlen=int(prefix))
            for cidr in added:
                address, prefix = cidr.split("/")
                ipr.addr("add", index=index, address=address, prefixlen=int(prefix))


class KernelWireGuard(_Link):
    mode: WireGuardMode = "kernel"

    async def start(self) -> None:
        await asyncio.to_thread(self._create)
        self.current = None

    async def stop(self) -> None:
        await asyncio.to_thread(self._delete)
        self.current = None

    async def apply(self, plan: InterfacePlan) -> None:
        """Make the interface match ``plan``, touching only what differs."""
        await asyncio.to_thread(self._configure, plan_changes(plan, self.current))
        await self._apply_addresses(plan)
        self.current = plan

    async def peers(self) -> list[PeerState]:
        return kernel_peer_states(await asyncio.to_thread(self._info))

    def _create(self) -> None:
        with IPRoute() as ipr:
            # A link left by an earlier run would carry its old keys and peers: start clean.
            for index in ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=index)
            try:
                ipr.link("add", ifname=self.name, kind="wireguard")
            except NetlinkError as error:
                raise WireGuardError(
                    f"cannot create wireguard link {self.name}: {_describe(error)}"
                ) from error
            ipr.link("set", index=self._index(ipr), state="up")

    def _delete(self) -> None:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=index)

    def _configure(self, changes: PlanChanges) -> None:
        # pyroute2 sends one peer per request; an unchanged peer gets none at all.
        try:
            with WireGuard() as wg:
                if changes.private_key is not None or changes.listen_port is not None:
                    wg.set(
                        self.name,
                        private_key=changes.private_key,
                        listen_port=changes.listen_port,
                    )
                for key in changes.removed:
                    wg.set(self.name, peer={"public_key": key, "remove": True})
                for peer in changes.changed:
                    wg.set(self.name, peer=netlink_peer(peer))
        except (NetlinkError, OSError, ValueError) as error:
            raise WireGuardError(
                f"kernel WireGuard refused the configuration: {_describe(error)}"
            ) from error

    def _info(self) -> list[Any]:
        with WireGuard() as wg:
            return list(wg.info(self.name))


def kernel_peer_states(messages: Iterable[Any]) -> list[PeerState]:
    """Peers from the kernel's ``WG_CMD_GET_DEVICE`` dump (pyroute2 ``wgmsg``s).

    The kernel splits a large device over several messages; a peer whose allowed IPs continue
    into the next message appears there again with only its key and those IPs, so fragments are
    merged by key and the counters come from the fragment that carries them."""
    found: dict[str, PeerState] = {}
    for message in messages:
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            key = base64.b64decode(peer.get_attr("WGPEER_A_PUBLIC_KEY")).hex()
            rx_bytes = peer.get_attr("WGPEER_A_RX_BYTES")
            if rx_bytes is None:  # a continuation fragment
                found.setdefault(key, PeerState(key, 0, 0, 0))
                continue
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            found[key] = PeerState(
                public_key_hex=key,
                last_handshake_seconds=int(handshake["tv_sec"]) if handshake else 0,
                rx_bytes=int(rx_bytes),
                tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
            )
    return list(found.values())


class UserspaceWireGuard(_Link):
    mode: WireGuardMode = "userspace"

    def __init__(self, name: str, uapi_dir: Path = UAPI_DIR) -> None:
        super().__init__(name)
        self.socket_path = uapi_dir / f"{name}.sock"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = find_wireguard_go()
        if binary is None:
            raise WireGuardUnavailable(NO_WIREGUARD)
        # A wireguard-go left by an edge that was killed still holds the name: take it over.
        await asyncio.to_thread(self._delete_stale_link)
        await self._take_socket_path()
        self.process = await asyncio.create_subprocess_exec(
            binary, "-f", self.name, preexec_fn=_die_with_parent
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                while not self.socket_path.exists():
                    if self.process.returncode is not None:
                        raise WireGuardError(f"wireguard-go exited with {self.process.returncode}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise WireGuardError(f"no UAPI socket at {self.socket_path}") from None
        await asyncio.to_thread(self._link_up)

    async def _take_socket_path(self) -> None:
        """The UAPI socket's path is per host, not per network namespace: refuse to steal
        one that still answers, remove one left by a dead process."""
        if not self.socket_path.exists():
            return
        try:
            _, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            return
        writer.close()
        raise WireGuardError(
            f"another wireguard-go already serves {self.socket_path}; "
            "give this edge another --wireguard-interface"
        )

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
        await self._apply_addresses(plan)
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


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the edge dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _peer(fields: dict[str, str]) -> PeerState:
    return PeerState(
        public_key_hex=fields["public_key"],
        last_handshake_seconds=int(fields.get("last_handshake_time_sec", "0")),
        rx_bytes=int(fields.get("rx_bytes", "0")),
        tx_bytes=int(fields.get("tx_bytes", "0")),
    )


def _describe(error: Exception) -> str:
    """pyroute2's NetlinkError prints as a tuple; say what the errno means instead."""
    if isinstance(error, NetlinkError):
        return os.strerror(error.code)
    return str(error)


def kernel_wireguard_available() -> str | None:
    """None if kernel WireGuard can be used here, otherwise why not.

    Loaded or built in, the module only counts if a link can actually be made (root or
    CAP_NET_ADMIN, not blocked by a sandbox) and its netlink family answers, so probe both on a
    throwaway link."""
    name = f"kmwgprobe{os.getpid() % 1_000_000}"  # interface names have at most 15 characters
    try:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=name):  # left by a crashed probe
                ipr.link("del", index=index)
            ipr.link("add", ifname=name, kind="wireguard")
            try:
                with WireGuard() as wg:
                    wg.info(name)
            finally:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
    except (NetlinkError, OSError) as error:
        reason = f"cannot create a wireguard link: {_describe(error)}"
        if not Path("/sys/module/wireguard").exists():
            reason += " (no wireguard module loaded)"
        return reason
    return None


def open_wireguard(
    name: str, mode: Literal["auto", "kernel", "userspace"] = "auto"
) -> WireGuardInterface:
    """The driver for interface ``name``: kernel WireGuard if ``mode`` asks for it or, in
    ``auto``, if the kernel has it; wireguard-go otherwise."""
    if mode == "userspace":
        log.info("WireGuard: userspace wireguard-go (requested)")
        return UserspaceWireGuard(name)
    reason = kernel_wireguard_available()
    if reason is None:
        log.info("WireGuard: kernel")
        return KernelWireGuard(name)
    if mode == "kernel":
        raise WireGuardUnavailable(
            f"kernel WireGuard was requested (--wireguard-mode kernel) but is unavailable: {reason}"
        )
    log.info("WireGuard: userspace wireguard-go (kernel: %s)", reason)
    return UserspaceWireGuard(name)
