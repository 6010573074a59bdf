"""Gateway reconciler.

A Gateway is a pool of instances. This version runs pools of mode External: one instance on a
host outside the cluster (installed with the one-liner), with its own API key and WireGuard
keypair in a Secret of the operator's namespace, a stable gateway index, and the public address
from spec. InCluster pools (a DaemonSet with one instance per node) and detecting the address from
the connection are not available yet; their conditions say so.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from uuid import UUID, uuid5

import kopf

from kakuremichi.addressing import AllocationConflict, PoolExhausted
from kakuremichi.conditions import READY, ConditionStatus, make_condition, set_condition
from kakuremichi.control.context import Context
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.metrics import counted
from kakuremichi.control.mirror import GatewayRow
from kakuremichi.credentials import wireguard_public_key
from kakuremichi.edge_config import GatewayNode
from kakuremichi.resources import (
    GATEWAY,
    GROUP,
    VERSION,
    GatewayInstanceStatus,
    GatewaySpec,
    GatewayStatus,
)

log = logging.getLogger(__name__)


def credentials_secret_name(gateway_name: str) -> str:
    return f"kakuremichi-gateway-{gateway_name}"


def instance_id(gateway_uid: str, instance_name: str) -> UUID:
    """Stable id of one instance of a pool (the ``gateways`` row's id)."""
    return uuid5(UUID(gateway_uid), instance_name)


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    name, generation = meta.name or "", meta.get("generation")
    spec = GatewaySpec.model_validate(dict(body.spec))
    current = GatewayStatus.model_validate(dict(body.status))

    def with_ready(status: ConditionStatus, reason: str, message: str) -> dict[str, Any]:
        condition = make_condition(
            READY,
            status,
            reason,
            message,
            observed_generation=generation,
        )
        return {
            "conditions": set_condition(current.conditions, condition),
            "observed_generation": generation,
        }

    def write(updates: dict[str, Any]) -> None:
        updated = current.model_copy(update=updates)
        patch.status.update(updated.model_dump(mode="json", by_alias=True, exclude_none=True))

    if spec.mode == "InCluster":
        write(with_ready("False", "Unsupported",
                         "InCluster gateway pools (DaemonSet) are not available in this version; "
                         "use mode External"))  # fmt: skip
        return

    instance_name = name
    gid = instance_id(meta.uid, instance_name)
    known = next((i for i in current.instances if i.name == instance_name), None)
    try:
        if known is not None:
            context.state.gateway_indexes.restore(gid, known.index)
            index = known.index
        else:
            index = context.state.gateway_indexes.allocate(gid)
    except (PoolExhausted, AllocationConflict) as error:
        write(with_ready("False", "IndexUnavailable", str(error)))
        raise kopf.TemporaryError(str(error), delay=15) from error

    secret_name = credentials_secret_name(name)
    api_key, private_key = await ensure_credentials(
        context.kube, context.settings.system_namespace, secret_name, "gateway", body,
        {"kakuremichi.io/gateway": name},
    )  # fmt: skip
    public_key = wireguard_public_key(private_key)
    digest = context.state.add_gateway_credentials(gid, api_key)
    public_ip = spec.public_ip or (known.public_ip if known else None)
    instance = GatewayInstanceStatus(
        name=instance_name,
        index=index,
        public_ip=public_ip,
        wireguard_public_key=public_key,
        state=known.state if known else "offline",
        last_seen_at=known.last_seen_at if known else None,
    )
    common = {
        "credentials_secret": secret_name,
        "public_ip": public_ip,
        "instances": [instance],
    }
    if public_ip is None:
        write(common | with_ready(
            "False", "WaitingForAddress",
            "set spec.publicIP: detecting the address from the connection is not available yet",
        ))  # fmt: skip
        return
    node = GatewayNode(
        id=gid,
        name=instance_name,
        index=index,
        public_ip=public_ip,
        public_key=public_key,
        wireguard_port=spec.ports.wireguard,
        http_port=spec.ports.http,
        https_port=spec.ports.https,
    )
    context.state.set_gateway(node)
    context.state.credential_secrets[gid] = (context.settings.system_namespace, secret_name)
    await context.mirror.upsert_gateway(
        GatewayRow(gid, instance_name, digest, public_ip, public_key, spec.region)
    )
    write(
        common | with_ready("True", "Provisioned", f"gateway index {index}, public IP {public_ip}")
    )


async def cleanup(context: Context, body: kopf.Body) -> None:
    meta = body.metadata
    gid = instance_id(meta.uid, meta.name or "")
    context.state.remove_gateway(gid)
    await context.mirror.delete_gateway(gid)
    await context.kube.delete_secret(
        context.settings.system_namespace, credentials_secret_name(meta.name or "")
    )


async def restore_indexes(context: Context) -> None:
    """Re-register every instance's gateway index from status before any reconcile runs."""
    gateways = await context.kube.list_objects(GATEWAY)
    gateways.sort(key=lambda g: (g["metadata"]["creationTimestamp"], g["metadata"]["uid"]))
    for gateway in gateways:
        for instance in (gateway.get("status") or {}).get("instances", []):
            with contextlib.suppress(AllocationConflict, ValueError, KeyError):
                context.state.gateway_indexes.restore(
                    instance_id(gateway["metadata"]["uid"], instance["name"]), instance["index"]
                )


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    resource = (GROUP, VERSION, GATEWAY.plural)

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @counted("Gateway")
    async def gateway_reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconcile(context, body, patch)

    @kopf.on.delete(*resource, registry=registry)
    async def gateway_cleanup(body: kopf.Body, **_: Any) -> None:
        await cleanup(context, body)
