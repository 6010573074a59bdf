"""What an edge counts, and its ``/metrics`` exposition.

The data path increments plain integers (a dict lookup per event, no locks or label objects);
Prometheus reads them through a collector at scrape time, so counting costs almost nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kakuremichi import __version__


@dataclass
class PeerSample:
    public_key: str
    """base64"""
    latest_handshake: int
    """Unix seconds; 0 before the first handshake."""
    rx_bytes: int
    tx_bytes: int


@dataclass
class EdgeStats:
    role: str
    wireguard_mode: str = "unknown"
    received_bytes: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes from clients toward origins, by tunnel (domain)."""
    sent_bytes: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes from origins back to clients, by tunnel."""
    requests: defaultdict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    """Completed requests by tunnel and status code (gateways)."""
    connections_total: int = 0
    active_connections: int = 0
    errors: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    config_version: int = 0
    config_applied_at: float = 0.0
    config_errors: int = 0
    tunnels: int = 0
    control_connected: bool = False
    peers: list[PeerSample] = field(default_factory=list)

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return registry


class _Collector(Collector):
    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        prefix = f"kakuremichi_{s.role}"
        info = GaugeMetricFamily(
            f"{prefix}_info", "Version and WireGuard mode", labels=["version", "wireguard_mode"]
        )
        info.add_metric([__version__, s.wireguard_mode], 1)
        yield info
        traffic = CounterMetricFamily(
            f"{prefix}_bytes",
            "Bytes relayed, by tunnel and direction",
            labels=["tunnel", "direction"],
        )
        for domain, count in sorted(s.received_bytes.items()):
            traffic.add_metric([domain, "in"], count)
        for domain, count in sorted(s.sent_bytes.items()):
            traffic.add_metric([domain, "out"], count)
        yield traffic
        if s.role == "gateway":
            requests = CounterMetricFamily(
                f"{prefix}_requests",
                "Requests by tunnel and status code",
                labels=["tunnel", "code"],
            )
            for (domain, code), count in sorted(s.requests.items()):
                requests.add_metric([domain, str(code)], count)
            yield requests
        yield CounterMetricFamily(
            f"{prefix}_connections", "Connections accepted", value=s.connections_total
        )
        yield GaugeMetricFamily(
            f"{prefix}_active_connections", "Connections open now", value=s.active_connections
        )
        errors = CounterMetricFamily(f"{prefix}_errors", "Errors by kind", labels=["kind"])
        for kind, count in sorted(s.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            f"{prefix}_config_version", "Version of the applied config", value=s.config_version
        )
        yield GaugeMetricFamily(
            f"{prefix}_config_applied_timestamp_seconds",
            "When the last config was applied",
            value=s.config_applied_at,
        )
        yield CounterMetricFamily(
            f"{prefix}_config_errors", "Configs that could not be applied", value=s.config_errors
        )
        yield GaugeMetricFamily(f"{prefix}_tunnels", "Tunnels served", value=s.tunnels)
        yield GaugeMetricFamily(
            f"{prefix}_control_connected",
            "1 while the control channel is up",
            value=1 if s.control_connected else 0,
        )
        handshake = GaugeMetricFamily(
            f"{prefix}_wireguard_peer_handshake_age_seconds",
            "Seconds since each WireGuard peer's latest handshake",
            labels=["peer"],
        )
        now = time.time()
        for peer in s.peers:
            if peer.latest_handshake:
                handshake.add_metric([peer.public_key], max(0.0, now - peer.latest_handshake))
        yield handshake
