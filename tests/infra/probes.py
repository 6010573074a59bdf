"""TCP probes between test hosts: a listener that greets, and a connection attempt that says
whether the handshake completed (something listens there for this sender)."""

from __future__ import annotations

import subprocess
import sys

from tests.infra import netns

_LISTEN = """
import socket, sys, threading
for port in sys.argv[2:]:
    server = socket.create_server((sys.argv[1], int(port)))
    def serve(server=server):
        while True:
            connection, _ = server.accept()
            connection.sendall(b"hi")
            connection.close()
    threading.Thread(target=serve, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

_CONNECT = """
import socket, sys
source = sys.argv[3] if len(sys.argv) > 3 else ""
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2,
                                  source_address=(source, 0) if source else None):
        print("open")
except OSError:
    print("closed")
"""


def listen(host: netns.Host, *ports: int, address: str = "0.0.0.0") -> None:
    """Listeners on ``ports`` inside ``host``, stopped with it."""
    process = subprocess.Popen(host.command(sys.executable, "-c", _LISTEN, address,
                                            *map(str, ports)),
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "listening"
    host._processes.append(process)  # type: ignore[arg-type]


def reachable(host: netns.Host, address: str, port: int, source: str = "") -> bool:
    """From ``host`` (from its ``source`` address, if given), does a TCP handshake complete?"""
    extra = [source] if source else []
    return host.exec(sys.executable, "-c", _CONNECT, address, str(port), *extra).strip() == "open"
