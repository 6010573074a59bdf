"""Pebble (Let's Encrypt's test ACME server) and pebble-challtestsrv as local processes.

Pebble listens on loopback with a serving certificate from a throw-away CA (``ca_bundle`` makes
ACME clients trust it). It resolves names through pebble-challtestsrv's DNS server, which answers
every name with ``default_ipv4`` (the gateway's address in the tests) unless told otherwise, and
validates HTTP-01 on ``http_port`` of that address. PEBBLE_VA_NOSLEEP=1 skips Pebble's random
validation delay; its default rate of rejected nonces stays on, so clients must retry badNonce.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.infra import binaries
from tests.infra.polling import wait_until
from tests.infra.ports import free_port, free_tcp_and_udp_port
from tests.infra.tlsgen import TestCA


@dataclass
class Pebble:
    directory_url: str
    management_url: str
    challtestsrv_url: str
    ca_bundle: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def root_pem(self) -> str:
        """Pebble's current root: issued chains verify against it (it changes every start)."""
        url = f"{self.management_url}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=10) as response:
            text: str = response.read().decode()
            return text

    def directory(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.directory_url, context=self._context(), timeout=10
        ) as response:
            document: dict[str, Any] = json.load(response)
            return document

    def _challtestsrv(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{self.challtestsrv_url}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def add_a(self, host: str, *addresses: str) -> None:
        """Answer A queries for ``host`` with ``addresses``."""
        self._challtestsrv("/add-a", {"host": host, "addresses": list(addresses)})

    def set_default_ipv4(self, address: str) -> bool:
        self._challtestsrv("/set-default-ipv4", {"ip": address})
        return True

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def start(
    workdir: Path,
    *,
    default_ipv4: str = "127.0.0.1",
    http_port: int = 80,
    validity_seconds: int = 7776000,
    short_validity_seconds: int = 120,
) -> Pebble:
    """Start pebble-challtestsrv and Pebble; they are stopped by :meth:`Pebble.stop`.

    Two certificate profiles are offered: ``default`` and ``shortlived`` (for renewal tests)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pebble_bin, challtestsrv_bin = binaries.find("pebble"), binaries.find("pebble-challtestsrv")
    if pebble_bin is None or challtestsrv_bin is None:
        raise RuntimeError(binaries.missing("pebble", "pebble-challtestsrv"))

    ca = TestCA("kakuremichi test CA for Pebble's listener")
    serving = ca.issue("localhost", "127.0.0.1")
    (workdir / "listener.crt").write_text(serving.certificate_pem)
    (workdir / "listener.key").write_text(serving.private_key_pem)
    ca_bundle = workdir / "listener-ca.pem"
    ca_bundle.write_text(ca.pem)

    acme_port, management_port = free_port(), free_port()
    dns_port, challtestsrv_port = free_tcp_and_udp_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": str(workdir / "listener.crt"),
            "privateKey": str(workdir / "listener.key"),
            "httpPort": http_port,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "retryAfter": {"authz": 1, "order": 1},
            "keyAlgorithm": "ecdsa",
            "profiles": {
                "default": {"description": "default", "validityPeriod": validity_seconds},
                "shortlived": {"description": "renewals", "validityPeriod": short_validity_seconds},
            },
        }
    }  # fmt: skip
    (workdir / "pebble.json").write_text(json.dumps(config, indent=2))

    processes = []
    with (workdir / "challtestsrv.log").open("ab") as log:
        processes.append(
            subprocess.Popen(
                [str(challtestsrv_bin), "-http01", "", "-https01", "", "-tlsalpn01", "",
                 "-doh", "", "-dnsserver", f"127.0.0.1:{dns_port}",
                 "-management", f"127.0.0.1:{challtestsrv_port}", "-defaultIPv4", default_ipv4,
                 "-defaultIPv6", ""],
                stdout=log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
    with (workdir / "pebble.log").open("ab") as log:
        processes.append(
            subprocess.Popen(
                [str(pebble_bin), "-config", str(workdir / "pebble.json"),
                 "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=log, stderr=subprocess.STDOUT,
                env={"PEBBLE_VA_NOSLEEP": "1", "PATH": "/usr/bin:/bin"},
            )
        )  # fmt: skip
    pebble = Pebble(
        directory_url=f"https://127.0.0.1:{acme_port}/dir",
        management_url=f"https://127.0.0.1:{management_port}",
        challtestsrv_url=f"http://127.0.0.1:{challtestsrv_port}",
        ca_bundle=ca_bundle,
        processes=processes,
    )
    try:
        wait_until(pebble.directory, "Pebble's directory", timeout=30)
        wait_until(lambda: pebble.set_default_ipv4(default_ipv4), "challtestsrv", timeout=30)
    except Exception:
        pebble.stop()
        raise
    return pebble
