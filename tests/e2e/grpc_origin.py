"""A gRPC service for the end-to-end tests, listening as gRPC servers do: HTTP/2 without TLS
(h2c). ``Say`` echoes; ``Count`` streams N messages and ends with trailing metadata, which only
an HTTP/2 trailer carries.

Run: python grpc_origin.py HOST PORT
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "kakuremichi.test.Echo"


def say(request: bytes, context: Any) -> bytes:
    return b"echo: " + request


def count(request: bytes, context: Any) -> Iterator[bytes]:
    for number in range(int(request)):
        yield str(number).encode()
    context.set_trailing_metadata((("x-counted", request.decode()),))


def main() -> None:
    host, port = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
