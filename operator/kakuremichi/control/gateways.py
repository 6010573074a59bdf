"""Gateway reconciler.

A Gateway is a pool of instances, each with its own API key and WireGuard keypair (in a Secret of
the operator's namespace), a stable gateway index and a public address:

- External: one instance on a host outside the cluster (installed with the one-liner), with the
  address from spec, else the source address of its first connection (:func:`adopt_address`).
- InCluster: a DaemonSet on the selected nodes. Its pods hold only the pool's shared key and
  their own projected ServiceAccount token; a pod that presents both with its node name, and
  that the token proves to be the DaemonSet's pod on that node (``control/pod_identity.py``), is
  admitted as that node's instance (:func:`admit_node`): control makes the node's own identity,
  takes the Node's ExternalIP (else InternalIP) unless spec pins one, and hands the API key
  over. An instance whose Node leaves is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any
from uuid import UUID, uuid5

import kopf

from kakuremichi.api import validation
from kakuremichi.api.conditions import ConditionStatus, set_ready
from kakuremichi.api.fields import status_patch
from kakuremichi.api.protocol import POD_TOKEN_AUDIENCE
from kakuremichi.api.resources import (
    GATEWAY,
    ClientLimits,
    GatewayInstanceStatus,
    GatewaySpec,
    GatewayStatus,
)
from kakuremichi.control import manifests, pod_identity
from kakuremichi.control.addressing import AllocationConflict, PoolExhausted
from kakuremichi.control.context import Context
from kakuremichi.control.credentials import wireguard_public_key
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.mirror import GatewayRow
from kakuremichi.control.reconciler import register_reconciler
from kakuremichi.control.state import GatewayPool
from kakuremichi.control.store import Gateway
from kakuremichi.control.topology import GatewayNode

log = logging.getLogger(__name__)


def front_end_settings(spec: GatewaySpec) -> dict[str, Any]:
    """What the pool's spec says about its HTTPS front end, as GatewayNode fields (default
    limits are left out of configs)."""
    limits = spec.client_limits
    return {
        "trusted_proxies": tuple(spec.trusted_proxies),
        "client_limits": None if limits == ClientLimits() else limits,
    }


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
    digest = context.state.add_gateway_credentials(gid, api_key)
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
    context.state.credential_secrets[gid] = (context.settings.system_namespace, secret_name)
    if public_ip is None:
        # Admitted without an address: the first connection's source address becomes it.
        context.state.pending_gateways[gid] = (node, digest, spec.region)
        write(common | with_ready(
            "False", "WaitingForAddress",
            "no spec.publicIP: the address the gateway first connects from will be used",
        ))  # fmt: skip
        return
    context.state.pending_gateways.pop(gid, None)
    await context.mirror.upsert_gateway(
        GatewayRow(gid, instance_name, digest, public_ip, public_key, spec.region)
    )
    context.state.set_gateway(node)
    write(
        common | with_ready("True", "Provisioned", f"gateway index {index}, public IP {public_ip}")
    )


async def adopt_address(context: Context, gateway_id: UUID, remote: str) -> None:
    """An External gateway without spec.publicIP connected: its source address becomes its
    public address (recorded in status, so it survives restarts)."""
    node, digest, region = context.state.pending_gateways[gateway_id]
    try:
        public_ip = validation.public_ipv4(remote)
    except ValueError as error:
        raise NodeRefused(
            f"cannot use the connection's source address as the public IP ({error}); "
            "connect from the public address or set spec.publicIP"
        ) from None
    node = dataclasses.replace(node, public_ip=public_ip)
    await context.mirror.upsert_gateway(
        GatewayRow(gateway_id, node.name, digest, public_ip, node.public_key, region)
    )
    async with context.status_locks.of(GATEWAY, "", node.pool):  # read, modify, write
        found = await context.kube.get_object(GATEWAY, "", node.pool)
        status = GatewayStatus.model_validate((found or {}).get("status") or {})
        instances = [
            i.model_copy(update={"public_ip": public_ip}) if i.name == node.name else i
            for i in status.instances
        ]
        conditions = set_ready(
            status.conditions, "True", "Provisioned",
            f"gateway index {node.index}, public IP {public_ip} (taken from its connection)",
            status.observed_generation,
        )  # fmt: skip
        await context.kube.patch_status(
            GATEWAY, "", node.pool,
            status_patch(status, {"public_ip": public_ip, "instances": instances,
                                  "conditions": conditions}),
        )  # fmt: skip
    del context.state.pending_gateways[gateway_id]
    context.state.set_gateway(node)


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


class NodeRefused(Exception):
    """A node cannot join its pool; the message says why."""


async def pod_refusal(context: Context, pool_uid: UUID, node: str, token: str | None) -> str | None:
    """Why ``token`` does not prove a pod of the pool running on ``node`` (None: it does).
    API errors propagate: the caller cannot tell a refusal from an outage then."""
    pool = context.state.pools.get(pool_uid)
    if pool is None:
        return "the Gateway is gone"
    if not token:
        return "no pod token: the pool's key alone proves no node"
    namespace = context.settings.system_namespace
    expected = pod_identity.ExpectedGatewayPod(
        namespace=namespace,
        service_account=manifests.gateway_service_account_name(pool.name),
        daemonset_uid=pool.daemonset_uid,
        audience=POD_TOKEN_AUDIENCE,
    )
    review = await context.kube.review_token(token, POD_TOKEN_AUDIENCE)
    pod_name = pod_identity.bound_pod(review, expected)
    pod = await context.kube.pod_facts(namespace, pod_name) if pod_name else None
    return pod_identity.refusal(review, pod, expected, node)


def node_secret_name(pool: str, node: str) -> str:
    return f"kakuremichi-gateway-{pool}-{node}"[:253]


async def admit_node(context: Context, pool_uid: UUID, node: str) -> tuple[UUID, str]:
    """Give ``node`` of an InCluster pool its own gateway identity: API key, WireGuard keypair,
    index and public address. Returns the instance's id and API key."""
    pool = context.state.pools.get(pool_uid)
    if pool is None:
        raise NodeRefused("the Gateway is gone")
    # Admissions read, extend and write the pool's instance list: one at a time per pool.
    async with context.status_locks.of(GATEWAY, "", pool.name):
        return await _admit_node(context, pool, node)


async def _admit_node(context: Context, pool: GatewayPool, node: str) -> tuple[UUID, str]:
    found_node = await context.kube.node(node)
    if found_node is None:
        raise NodeRefused(f"there is no Node named {node}")
    addresses, labels = found_node
    # The pool's key is shared by its pods: at least hold it to the nodes the pool selects.
    if not pool.spec.node_selector.items() <= labels.items():
        raise NodeRefused(f"Node {node} does not match the Gateway's nodeSelector")
    if pool.spec.public_ip:
        public_ip = pool.spec.public_ip
    else:
        public_ip = addresses.get("ExternalIP") or addresses.get("InternalIP") or ""
        try:
            validation.public_ipv4(public_ip)
        except ValueError as error:
            raise NodeRefused(f"Node {node} has no usable address: {error}") from None
    found = await context.kube.get_object(GATEWAY, "", pool.name)
    status = GatewayStatus.model_validate((found or {}).get("status") or {})
    if pool.spec.public_ip and any(i.name != node for i in status.instances):
        raise NodeRefused(
            f"spec.publicIP pins one address, which allows a pool of one node; "
            f"{status.instances[0].name} already holds it"
        )
    gid = instance_id(str(pool.uid), node)
    namespace = context.settings.system_namespace
    secret_name = node_secret_name(pool.name, node)
    api_key, private_key = await ensure_credentials(
        context.kube, namespace, secret_name, "gateway", pool.owner,
        {"kakuremichi.io/gateway": pool.name},
    )  # fmt: skip
    known = next((i for i in status.instances if i.name == node), None)
    if known is not None:
        context.state.gateway_indexes.restore(gid, known.index)
        index = known.index
    else:
        index = context.state.gateway_indexes.allocate(gid)
    public_key = wireguard_public_key(private_key)
    digest = context.state.add_gateway_credentials(gid, api_key)
    context.state.credential_secrets[gid] = (namespace, secret_name)
    ports = pool.spec.ports
    context.state.set_gateway(
        GatewayNode(gid, node, index, public_ip, public_key, pool.name, ports.wireguard,
                    ports.http, ports.https, **front_end_settings(pool.spec))
    )  # fmt: skip
    await context.mirror.upsert_gateway(
        GatewayRow(gid, pool.name, digest, public_ip, public_key, pool.spec.region)
    )
    instance = GatewayInstanceStatus(
        name=node, index=index, public_ip=public_ip, wireguard_public_key=public_key,
        state=known.state if known else "offline",
        last_seen_at=known.last_seen_at if known else None,
    )  # fmt: skip
    instances = [i for i in status.instances if i.name != node] + [instance]
    await context.kube.patch_status(
        GATEWAY, "", pool.name,
        {"instances": [i.model_dump(mode="json", by_alias=True, exclude_none=True)
                       for i in sorted(instances, key=lambda i: i.index)]},
    )  # fmt: skip
    return gid, api_key


async def remove_node(context: Context, node: str) -> None:
    """A Node left the cluster: its instances leave their pools."""
    for pool in list(context.state.pools.values()):
        gid = instance_id(str(pool.uid), node)
        if gid not in context.state.gateways and gid not in context.state.credential_secrets:
            continue
        context.state.remove_gateway(gid)
        await context.mirror.delete_gateway(gid)
        await context.kube.delete_secret(
            context.settings.system_namespace, node_secret_name(pool.name, node)
        )
        async with context.status_locks.of(GATEWAY, "", pool.name):  # read, modify, write
            found = await context.kube.get_object(GATEWAY, "", pool.name)
            status = GatewayStatus.model_validate((found or {}).get("status") or {})
            await context.kube.patch_status(
                GATEWAY, "", pool.name,
                {"instances": [i.model_dump(mode="json", by_alias=True, exclude_none=True)
                               for i in status.instances if i.name != node]},
            )  # fmt: skip


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

    # Nodes carry no finalizer of ours: the watch's DELETED event is the signal.
    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(type: str, name: str, **_: Any) -> None:
        if type == "DELETED":
            await remove_node(context, name)
