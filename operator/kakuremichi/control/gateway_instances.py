"""Names and ids of gateway instances, shared by the Gateway reconciler and node admission: an
External Gateway is one instance, an InCluster pool one per admitted node."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from kakuremichi.api.resources import ClientLimits, GatewaySpec


def front_end_settings(spec: GatewaySpec) -> dict[str, Any]:
    """What the pool's spec says about its front end and its Tunnels' ports, as GatewayNode
    fields (default limits are left out of configs)."""
    limits = spec.client_limits
    return {
        "trusted_proxies": tuple(spec.trusted_proxies),
        "client_limits": None if limits == ClientLimits() else limits,
        "accept_proxy_protocol": spec.accept_proxy_protocol,
        "tunnel_ports": tuple((r.first, r.last) for r in spec.tunnel_ports),
    }


def credentials_secret_name(gateway_name: str) -> str:
    return f"kakuremichi-gateway-{gateway_name}"


def instance_id(gateway_uid: str, instance_name: str) -> UUID:
    """Stable id of one instance of a pool (the ``gateways`` row's id)."""
    return uuid5(UUID(gateway_uid), instance_name)


def node_secret_name(pool: str, node: str) -> str:
    return f"kakuremichi-gateway-{pool}-{node}"[:253]
