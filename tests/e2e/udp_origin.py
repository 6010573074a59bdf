"""A UDP origin that expects a PROXY v2 header on every datagram and answers with what it says:
``from CLIENT:PORT to GATEWAY:PORT said PAYLOAD``. ``python udp_origin.py HOST PORT``."""

from __future__ import annotations

import socket
import sys

from kakuremichi.edge.proxy_header import ProxyHeaderError, parse


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((sys.argv[1], int(sys.argv[2])))
    while True:
        data, peer = sock.recvfrom(65535)
        try:
            header = parse(data)
        except ProxyHeaderError as error:
            sock.sendto(f"no header: {error}".encode(), peer)
            continue
        if header is None or header.source is None or header.destination is None:
            sock.sendto(b"no client in the header", peer)
            continue
        source, destination = header.source, header.destination
        said = data[header.length :]
        answer = f"from {source[0]}:{source[1]} to {destination[0]}:{destination[1]} said {said!r}"
        sock.sendto(answer.encode(), peer)


if __name__ == "__main__":
    main()
