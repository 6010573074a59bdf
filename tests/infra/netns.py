"""Separate hosts for tests: Linux network namespaces joined by veth links.

Each :class:`Host` is a network namespace named ``kmt-<pid>-<n>-<role>``. The creating process id
in the name lets a later run sweep away what a crashed run left behind (:func:`sweep_stale`).
Cleanup kills every process still inside a namespace before deleting it: processes outlive the
deletion of their namespace otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from typing import IO

PREFIX = "kmt-"
_counter = itertools.count(1)
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-")


def run(*args: str, check: bool = True, input_text: str | None = None) -> str:
    result = subprocess.run(
        list(args), input=input_text, capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def can_create_namespaces() -> str | None:
    """None when namespaces work here, otherwise the reason they do not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}-probe-{secrets.token_hex(2)}"
    try:
        run("ip", "netns", "add", probe)
    except (RuntimeError, FileNotFoundError) as error:
        return f"cannot create a network namespace: {error}"
    run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """A network namespace standing in for one machine."""

    role: str
    name: str = ""
    addresses: list[IPv4Interface] = field(default_factory=list)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _root_links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{self.role}"[:48]
        run("ip", "netns", "add", self.name)
        self.exec("ip", "link", "set", "lo", "up")

    @property
    def address(self) -> str:
        """The host's first address on a link, as text."""
        return str(self.addresses[0].ip)

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, *args: str, check: bool = True, input_text: str | None = None) -> str:
        return run(*self.command(*args), check=check, input_text=input_text)

    def spawn(
        self, args: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespace; it is stopped on cleanup."""
        out: IO[bytes] | int = log.open("ab") if log else subprocess.DEVNULL
        process = subprocess.Popen(
            self.command(*args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def set_hosts(self, entries: dict[str, str]) -> None:
        """Name resolution inside this namespace: ``ip netns exec`` bind-mounts this file over
        /etc/hosts, so curl and every resolver call in the namespace see these names."""
        folder = Path("/etc/netns") / self.name
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ip in entries.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.name, check=False)
        return [int(pid) for pid in out.split()]

    def destroy(self) -> None:
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        kill_namespace_processes(self.name)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        # The kernel tears a deleted namespace's veths down later, in the background; a root
        # end still holding its address then would swallow the next run's replies.
        for root_end in self._root_links:
            run("ip", "link", "del", root_end, check=False)
        run("ip", "netns", "del", self.name, check=False)
        with contextlib.suppress(FileNotFoundError):
            for path in (Path("/etc/netns") / self.name).iterdir():
                path.unlink()
            (Path("/etc/netns") / self.name).rmdir()


HostFactory = Callable[[str], Host]


def kill_namespace_processes(name: str, grace: float = 3.0) -> None:
    """TERM, then KILL, every process whose network namespace is ``name``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run("ip", "netns", "pids", name, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not run("ip", "netns", "pids", name, check=False).split():
                return
            time.sleep(0.05)


def link(a: Host, b: Host, subnet: str) -> tuple[IPv4Interface, IPv4Interface]:
    """Join two hosts with a veth pair; ``a`` gets .1 and ``b`` .2 of ``subnet`` (a /24)."""
    token = secrets.token_hex(3)
    end_a, end_b = f"va{token}", f"vb{token}"
    run("ip", "link", "add", end_a, "type", "veth", "peer", "name", end_b)
    run("ip", "link", "set", end_a, "netns", a.name)
    run("ip", "link", "set", end_b, "netns", b.name)
    base = subnet.rsplit(".", 1)[0]
    addresses = (IPv4Interface(f"{base}.1/24"), IPv4Interface(f"{base}.2/24"))
    for host, end, address in ((a, end_a, addresses[0]), (b, end_b, addresses[1])):
        host.exec("ip", "addr", "add", str(address), "dev", end)
        host.exec("ip", "link", "set", end, "up")
        host.addresses.append(address)
    return addresses


def link_root(host: Host, subnet: str) -> tuple[IPv4Interface, IPv4Interface]:
    """Join ``host`` to the root namespace (where the API server, Pebble and the operator run):
    the root end gets .1 and the host .2 of ``subnet``. Deleting the host removes the link."""
    token = secrets.token_hex(3)
    root_end, host_end = f"vr{token}", f"vh{token}"
    run("ip", "link", "add", root_end, "type", "veth", "peer", "name", host_end)
    run("ip", "link", "set", host_end, "netns", host.name)
    base = subnet.rsplit(".", 1)[0]
    root_address, host_address = IPv4Interface(f"{base}.1/24"), IPv4Interface(f"{base}.2/24")
    for line in run("ip", "-o", "-4", "addr", "show", "to", f"{base}.0/24").splitlines():
        stale = line.split()[1].split("@")[0]
        if stale.startswith("vr"):  # a root end left by an earlier run
            run("ip", "link", "del", stale, check=False)
    host._root_links.append(root_end)
    run("ip", "addr", "add", str(root_address), "dev", root_end)
    run("ip", "link", "set", root_end, "up")
    host.exec("ip", "addr", "add", str(host_address), "dev", host_end)
    host.exec("ip", "link", "set", host_end, "up")
    host.exec("ip", "route", "add", "default", "via", str(root_address.ip), check=False)
    host.addresses.append(host_address)
    return root_address, host_address


def sweep_stale() -> list[str]:
    """Delete namespaces left by test runs whose process is gone."""
    removed = []
    for line in run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAME_RE.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        kill_namespace_processes(name)
        run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
