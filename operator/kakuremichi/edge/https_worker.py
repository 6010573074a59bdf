"""One HTTPS worker process of a gateway (``python -m kakuremichi.edge.https_worker``), and the
lines it exchanges with the gateway over its stdin and stdout.

It serves the listening sockets it was handed (``--listen-fds``) once it serves a config; it
reads :class:`WorkerConfig` lines and answers each with a :class:`WorkerReport`, sends its
counters as they change, and exits when its stdin closes, so that none outlives the gateway.
The supervisor is ``edge/https_workers.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.edge.file_limit import raise_file_limit
from kakuremichi.edge.front_end import HttpsFrontEnd
from kakuremichi.edge.gateway_routes import FrontEndConfig
from kakuremichi.edge.sni import CertificateError
from kakuremichi.edge.stats import DataPathCounters, EdgeStats

REPORT_INTERVAL = 0.25
"""How often a worker sends its counters (when they changed)."""
LINE_LIMIT = 1 << 28
"""A config carries every certificate the gateway serves: lines can be large."""


class WorkerConfig(BaseModel):
    """What a worker serves: the gateway's front end, numbered."""

    model_config = ConfigDict(frozen=True)

    sequence: int
    front_end: FrontEndConfig = Field(default_factory=FrontEndConfig)


class WorkerReport(BaseModel):
    """A worker's line to the gateway."""

    applied: int | None = None
    """The sequence of the config it now serves."""
    error: str | None = None
    """Why it could not serve that config (it keeps serving the one before)."""
    counters: DataPathCounters | None = None


class WorkerProcess:
    """The worker's side: serve the front end on the listening sockets handed over, apply each
    config line, report counters."""

    def __init__(self, slot: int, relay_port: int) -> None:
        self.slot = slot
        self.stats = EdgeStats("gateway")
        self.front_end = HttpsFrontEnd(self.stats, relay_port)
        self.proxy = self.front_end.proxy
        self.out = sys.stdout.buffer

    def report(self, report: WorkerReport) -> None:
        self.out.write(report.model_dump_json(exclude_none=True).encode() + b"\n")
        self.out.flush()

    def apply(self, config: WorkerConfig) -> None:
        try:
            prepared = self.front_end.prepare(config.front_end)
        except CertificateError as error:
            self.report(WorkerReport(error=str(error)))
            return
        self.front_end.install(prepared)
        self.report(WorkerReport(applied=config.sequence))

    async def report_counters(self) -> None:
        last: DataPathCounters | None = None
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            counters = self.stats.counters()
            if counters != last:
                self.report(WorkerReport(counters=counters))
                last = counters

    async def serve(self, fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stdin.feed_eof)
        tasks = [
            asyncio.create_task(self.proxy.sweep_forever()),
            asyncio.create_task(self.report_counters()),
        ]
        servers: list[asyncio.Server] = []
        try:
            while line := await stdin.readline():
                try:
                    self.apply(WorkerConfig.model_validate_json(line))
                except ValidationError as error:
                    self.report(WorkerReport(error=f"unreadable config: {error}"))
                    continue
                # Connections wait in the kernel's queue until the first config is served.
                while len(servers) < len(fds):
                    listener = socket.socket(fileno=fds[len(servers)])
                    server = await loop.create_server(self.connection, sock=listener, backlog=4096)
                    servers.append(server)
        finally:
            for server in servers:
                server.close()
            self.proxy.close_all()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def connection(self) -> asyncio.Protocol:
        return self.proxy.tls_factory(self.front_end.sni.front)()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kakuremichi.edge.https_worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--listen-fds", required=True, help="comma-separated listening sockets")
    parser.add_argument("--relay-port", type=int, default=RELAY_PORT)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.slot}]: %(message)s",
    )
    raise_file_limit()
    fds = [int(fd) for fd in args.listen_fds.split(",") if fd]
    worker = WorkerProcess(args.slot, args.relay_port)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(worker.serve(fds))
    else:
        uvloop.run(worker.serve(fds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
