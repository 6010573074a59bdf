"""A hostile HTTPS client, run inside the client's network namespace:
``python -m tests.e2e.hostile_client SCENARIO DOMAIN ADDRESS CA_FILE`` prints what it saw as one
JSON document. Plain sockets and ``ssl``: every byte is the test's to choose."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from typing import Any


class Client:
    def __init__(self, domain: str, address: str, ca_file: str) -> None:
        self.domain, self.address = domain, address
        self.tls = ssl.create_default_context(cafile=ca_file)

    def connect(self, timeout: float = 10) -> ssl.SSLSocket:
        raw = socket.create_connection((self.address, 443), timeout=timeout)
        return self.tls.wrap_socket(raw, server_hostname=self.domain)

    def get(self, path: str, extra: str = "") -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self.domain}\r\n{extra}\r\n".encode()


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def whoami(client: Client, user: str) -> str:
    with client.connect() as sock:
        sock.sendall(client.get("/whoami", f"X-User: {user}\r\n"))
        return read_response(sock)[2].decode()


def desync(client: Client) -> dict[str, Any]:
    """The response-queue poisoning sequence, three rounds: an attacker leaves a body short
    after an early 401 and goes; then three users ask who they are."""
    answers = [whoami(client, "warm-up")]
    for _ in range(3):
        with client.connect() as sock:
            sock.sendall(b"POST /early HTTP/1.1\r\nHost: " + client.domain.encode()
                         + b"\r\nContent-Length: 300\r\n\r\n" + b"x" * 20)  # fmt: skip
            answers.append(str(read_response(sock)[0]))
        time.sleep(0.05)
        answers += [whoami(client, user) for user in ("victim", "bob", "carol")]
    return {"answers": answers}


def big_head(client: Client) -> dict[str, Any]:
    """20 MiB of header lines, as fast as they go, reading all the while."""
    began = time.monotonic()
    sent, status = 0, 0
    with client.connect() as sock:
        sock.sendall(client.get("/", "")[:-2])  # the head left open
        sock.setblocking(False)
        line = b"X-Filler: " + b"a" * 4000 + b"\r\n"
        answer = b""
        while sent < 20 * 1024 * 1024 and time.monotonic() - began < 20:
            try:
                sent += sock.send(line)
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.001)
            except OSError:
                break
            try:
                answer += sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                break
            if b"\r\n" in answer:
                break
        sock.setblocking(True)
        sock.settimeout(5)
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        if answer.startswith(b"HTTP/1.1 "):
            status = int(answer[9:12])
    return {"status": status, "seconds": time.monotonic() - began, "sent": sent}


def slow_head(client: Client) -> dict[str, Any]:
    """One byte of a head every half second, until the gateway gives up on it."""
    began = time.monotonic()
    answer = b""
    with client.connect() as sock:
        sock.settimeout(0.5)
        for byte in client.get("/", "X-Slow: " + "s" * 200 + "\r\n"):
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"\r\n" in answer:
                break
    status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0
    return {"status": status, "seconds": time.monotonic() - began}


def upgrade_refused(client: Client) -> dict[str, Any]:
    """An upgrade the origin answers 200, then requests that would pass only as raw bytes."""
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    with client.connect() as sock:
        sock.sendall(client.get("/ws", upgrade))
        first = read_response(sock)
        sock.sendall(f"GET /headers HTTP/1.1\r\nHost: {client.domain}\r\n"
                     "X-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n".encode())  # fmt: skip
        second = read_response(sock)
        sock.sendall(b"GET /headers HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
        third = read_response(sock)
    return {
        "first": [first[0], first[2].decode()],
        "second": [second[0], json.loads(second[2])["headers"]],
        "third": third[0],
    }


def headers(client: Client) -> dict[str, Any]:
    """What the origin receives for a request full of address and hop-by-hop fields."""
    spoof = (
        "X-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
        "True-Client-IP: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nConnection: X-Secret\r\n"
        "X-Secret: s\r\n"
    )
    with client.connect() as sock:
        sock.sendall(client.get("/headers", spoof))
        status, _, body = read_response(sock)
    return {"status": status, "headers": json.loads(body)["headers"]}


SCENARIOS = {f.__name__: f for f in (desync, big_head, slow_head, upgrade_refused, headers)}

if __name__ == "__main__":
    scenario, domain, address, ca_file = sys.argv[1:5]
    print(json.dumps(SCENARIOS[scenario](Client(domain, address, ca_file))))
