"""Gateway reconciler.

A Gateway is a pool of instances, each with its own API key and WireGuard keypair (in a Secret of
the operator's namespace), a stable gateway index and a public address:

- External: one instance on a host outside the cluster (installed with the one-liner), with the
  address from spec, else the source address of its first connection
  (:func:`~kakuremichi.control.node_admission.adopt_address`).
- InCluster: a DaemonSet on the selected nodes, running as a ServiceAccount of its own. Its pods
  hold only the pool's shared key and their own projected token; each is admitted as its node's
  instance when it connects (``node_admission``). Here: the pool's key, ServiceAccount and
  DaemonSet, and the re-admission of the nodes status lists after a restart.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from uuid import UUID

import kopf

from kakuremichi.api.conditions import ConditionStatus, set_ready
from kakuremichi.api.fields import status_patch
from kakuremichi.api.resources import (
    GATEWAY,
    GatewayInstanceStatus,
    GatewaySpec,
    GatewayStatus,
)
from kakuremichi.control import manifests
from kakuremichi.control.addressing import AllocationConflict, PoolExhausted
from kakuremichi.control.context import Context
from kakuremichi.control.credentials import wireguard_public_key
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.gateway_instances import (
    credentials_secret_name,
    front_end_settings,
    instance_id,
    node_secret_name,
)
from kakuremichi.control.mirror import GatewayRow
from kakuremichi.control.node_admission import NodeRefused, admit_node
from kakuremichi.control.reconciler import register_reconciler
from kakuremichi.control.state import GatewayPool
from kakuremichi.control.store import Gateway
from kakuremichi.control.topology import GatewayNode

log = logging.getLogger(__name__)


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    name, generation = meta.name or "", meta.get("generation")
    spec = GatewaySpec.model_validate(dict(body.spec))
    current = GatewayStatus.model_validate(dict(body.status))

    def with_ready(status: ConditionStatus, reason: str, message: str) -> dict[str, Any]:
        return {
            "conditions": set_ready(current.conditions, status, reason, message, generation),
            "observed_generation": generation,
        }

    def write(updates: dict[str, Any]) -> None:
        patch.status.update(status_patch(current, updates))

    if spec.mode == "InCluster":
        await reconcile_pool(context, body, spec, current)
        rolled = manifests.gateway_daemonset_name(name)
        write(
            {"credentials_secret": credentials_secret_name(name)}
            | with_ready("True", "RolledOut",
                         f"DaemonSet {context.settings.system_namespace}/{rolled}; each node's "
                         "gateway gets its own identity when it connects")
        )  # fmt: skip
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
    digest = context.state.add_gateway_credentials(
        gid, api_key, (context.settings.system_namespace, secret_name)
    )
    public_ip = spec.public_ip or (known.public_ip if known else None)
    connected = gid in context.presence.online
    instance = GatewayInstanceStatus(
        name=instance_name,
        index=index,
        public_ip=public_ip,
        wireguard_public_key=public_key,
        state=known.state if known and connected else "offline",
        last_seen_at=known.last_seen_at if known else None,
    )
    common: dict[str, Any] = {
        "credentials_secret": secret_name,
        "public_ip": public_ip,
        "instances": [instance],
    }
    if not connected:  # e.g. "online" left over from before a restart
        common["state"] = "offline"
    node = GatewayNode(
        id=gid,
        name=instance_name,
        pool=name,
        index=index,
        public_ip=public_ip or "",
        public_key=public_key,
        wireguard_port=spec.ports.wireguard,
        http_port=spec.ports.http,
        https_port=spec.ports.https,
        **front_end_settings(spec),
    )
    if public_ip is None:
        # Admitted without an address: the first connection's source address becomes it.
        context.state.await_address(node, digest, spec.region)
        write(common | with_ready(
            "False", "WaitingForAddress",
            "no spec.publicIP: the address the gateway first connects from will be used",
        ))  # fmt: skip
        return
    await context.mirror.upsert_gateway(
        GatewayRow(gid, instance_name, digest, public_ip, public_key, spec.region)
    )
    context.state.set_gateway(node)
    write(
        common | with_ready("True", "Provisioned", f"gateway index {index}, public IP {public_ip}")
    )


async def reconcile_pool(
    context: Context, body: kopf.Body, spec: GatewaySpec, current: GatewayStatus
) -> None:
    """An InCluster pool: its shared key, its DaemonSet, and the nodes already admitted."""
    meta = body.metadata
    name, uid = meta.name or "", UUID(meta.uid)
    namespace = context.settings.system_namespace
    secret_name = credentials_secret_name(name)
    api_key, _ = await ensure_credentials(
        context.kube, namespace, secret_name, "gateway", body, {"kakuremichi.io/gateway": name}
    )
    owner = {"apiVersion": body["apiVersion"], "kind": body["kind"],
             "metadata": {"name": name, "uid": meta.uid}}  # fmt: skip
    edge = context.settings.edge()
    await context.kube.apply_service_account(
        manifests.gateway_service_account(name, meta.uid, namespace)
    )
    daemonset_uid = await context.kube.apply_daemonset(
        manifests.gateway_daemonset(name, meta.uid, spec, edge, namespace, secret_name)
    )
    context.state.add_pool(GatewayPool(uid, name, owner, spec, daemonset_uid), api_key)
    for instance in current.instances:  # nodes admitted before a restart keep their identity
        with contextlib.suppress(kopf.TemporaryError, NodeRefused):
            await admit_node(context, uid, instance.name)


async def cleanup(context: Context, body: kopf.Body) -> None:
    meta = body.metadata
    name = meta.name or ""
    namespace = context.settings.system_namespace
    status = GatewayStatus.model_validate(dict(body.status))
    instance_names = {i.name for i in status.instances} | {name}
    for instance_name in instance_names:
        gid = instance_id(meta.uid, instance_name)
        context.state.remove_gateway(gid)
        await context.mirror.delete_gateway(gid)
        if instance_name != name:
            await context.kube.delete_secret(namespace, node_secret_name(name, instance_name))
    context.state.remove_pool(UUID(meta.uid))
    await context.kube.delete_secret(namespace, credentials_secret_name(name))
    # The DaemonSet is garbage-collected with the Gateway (owner reference).


async def restore_indexes(context: Context) -> set[str]:
    """Re-register every instance's gateway index from status before any reconcile runs.
    Returns the Gateways' uids."""
    gateways = await context.kube.list_objects(GATEWAY)
    gateways.sort(key=lambda g: (g["metadata"]["creationTimestamp"], g["metadata"]["uid"]))
    known: set[UUID] = set()
    for gateway in gateways:
        for instance in (gateway.get("status") or {}).get("instances", []):
            gid = instance_id(gateway["metadata"]["uid"], instance["name"])
            known.add(gid)
            with contextlib.suppress(AllocationConflict, ValueError, KeyError):
                context.state.gateway_indexes.restore(gid, instance["index"])
    await context.mirror.prune(Gateway, known)
    return {str(g["metadata"]["uid"]) for g in gateways}


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    register_reconciler(registry, context, GATEWAY, reconcile, cleanup)
