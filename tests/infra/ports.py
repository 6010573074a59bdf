"""Free loopback ports, so concurrent test runs never collide."""

from __future__ import annotations

import socket

# Ports already handed out in this process: the kernel may offer a just-closed port again, and two
# calls in a row (an HTTP and an HTTPS port) must not get the same one.
_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    for _ in range(1000):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no loopback port left that was not handed out before")


def free_tcp_and_udp_port() -> int:
    """A port free for both protocols (a DNS server listens on both)."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port is free for both TCP and UDP")
