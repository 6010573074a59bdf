"""WireGuard interfaces for test hosts: kernel WireGuard where the kernel has it, otherwise
``wireguard-go`` (the userspace implementation: the one hack/build-binaries.sh builds, which
tests/conftest.py puts first on PATH, else the system's), configured with ``wg`` either way.

wireguard-go keeps its UAPI socket in /var/run/wireguard/<interface>.sock, one folder for every
namespace, so interface names are unique per test run, not just per namespace.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.infra.netns import Host, run
from tests.infra.polling import wait_until

UAPI_DIR = Path("/var/run/wireguard")
Mode = Literal["kernel", "userspace"]


def kernel_wireguard_missing() -> str | None:
    """None when ``ip link add type wireguard`` works, otherwise why not."""
    name = f"kmtprobe{secrets.token_hex(2)}"
    probe = subprocess.run(
        ["ip", "link", "add", name, "type", "wireguard"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return (
            f"kernel has no WireGuard: `ip link add type wireguard` says {probe.stderr.strip()!r}"
        )
    run("ip", "link", "del", name, check=False)
    return None


def userspace_wireguard_missing() -> str | None:
    if shutil.which("wireguard-go") is None:
        return "wireguard-go is not installed: run hack/build-binaries.sh wireguard-go"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None


def available_mode() -> tuple[Mode | None, str]:
    """The mode tests should use, and a sentence saying why (or why none)."""
    kernel = kernel_wireguard_missing()
    if kernel is None:
        return "kernel", "kernel WireGuard"
    userspace = userspace_wireguard_missing()
    if userspace is None:
        return "userspace", f"wireguard-go, since the {kernel}"
    return None, f"{kernel}; {userspace}"


@dataclass
class Interface:
    host: Host
    name: str
    mode: Mode
    private_key: str
    public_key: str

    def set_peer(
        self,
        public_key: str,
        allowed_ips: str,
        endpoint: str | None = None,
        keepalive: int | None = None,
    ) -> None:
        args = ["wg", "set", self.name, "peer", public_key, "allowed-ips", allowed_ips]
        if endpoint:
            args += ["endpoint", endpoint]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        self.host.exec(*args)

    def latest_handshakes(self) -> dict[str, int]:
        out = self.host.exec("wg", "show", self.name, "latest-handshakes")
        return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line}

    def destroy(self) -> None:
        self.host.exec("ip", "link", "del", self.name, check=False)
        with contextlib.suppress(FileNotFoundError):
            (UAPI_DIR / f"{self.name}.sock").unlink()


def create(host: Host, mode: Mode, address: str, listen_port: int | None = None) -> Interface:
    """A WireGuard interface in ``host`` with ``address`` (CIDR), up, with a fresh key."""
    name = f"wg{secrets.token_hex(3)}"
    if mode == "kernel":
        host.exec("ip", "link", "add", name, "type", "wireguard")
    else:
        host.spawn(["wireguard-go", "--foreground", name])
        wait_until(lambda: (UAPI_DIR / f"{name}.sock").exists(), f"{name}'s UAPI socket", 10)
    private_key = run("wg", "genkey").strip()
    public_key = run("wg", "pubkey", input_text=private_key).strip()
    with tempfile.NamedTemporaryFile("w", suffix=".key") as key_file:
        key_file.write(private_key)
        key_file.flush()
        args = ["wg", "set", name, "private-key", key_file.name]
        if listen_port:
            args += ["listen-port", str(listen_port)]
        host.exec(*args)
    host.exec("ip", "addr", "add", address, "dev", name)
    host.exec("ip", "link", "set", name, "up")
    return Interface(host, name, mode, private_key, public_key)
