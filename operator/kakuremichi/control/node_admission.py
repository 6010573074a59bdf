"""Gateway instances that join when they connect.

- A pod of an InCluster pool presents the pool's key, its node and its pod-bound token:
  :func:`pod_refusal` checks the token and the pod (``pod_identity``); :func:`admit_node` gives
  the node its own identity (API key, WireGuard keypair, index, public address).
- An External Gateway without ``spec.publicIP``: its first connection's source address becomes
  its public address (:func:`adopt_address`).
- A Node that leaves takes its instances along (:func:`remove_node`, on the Node watch).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import kopf

from kakuremichi.api import validation
from kakuremichi.api.fields import status_patch
from kakuremichi.api.protocol import POD_TOKEN_AUDIENCE
from kakuremichi.api.resources import GATEWAY, GatewayInstanceStatus, GatewayStatus
from kakuremichi.control import manifests, pod_identity
from kakuremichi.control.context import Context
from kakuremichi.control.credentials import wireguard_public_key
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.gateway_instances import front_end_settings, instance_id, node_secret_name
from kakuremichi.control.mirror import GatewayRow
from kakuremichi.control.state import GatewayPool
from kakuremichi.control.topology import GatewayNode


async def adopt_address(context: Context, gateway_id: UUID, remote: str) -> str:
    """An External gateway without spec.publicIP connected: its source address becomes its
    public address. Recorded in the Gateway's status (where it survives restarts); returns the
    Gateway's name, whose reconcile then serves the instance and says it is Provisioned."""
    node, _, _ = context.state.pending_gateways[gateway_id]
    try:
        public_ip = validation.public_ipv4(remote)
    except ValueError as error:
        raise NodeRefused(
            f"cannot use the connection's source address as the public IP ({error}); "
            "connect from the public address or set spec.publicIP"
        ) from None

    def adopted(found: dict[str, Any]) -> dict[str, Any]:
        status = GatewayStatus.model_validate(found)
        instances = [
            i.model_copy(update={"public_ip": public_ip}) if i.name == node.name else i
            for i in status.instances
        ]
        return status_patch(status, {"public_ip": public_ip, "instances": instances})

    await context.statuses.update(GATEWAY, "", node.pool, adopted)
    return node.pool


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


async def admit_node(context: Context, pool_uid: UUID, node: str) -> tuple[UUID, str]:
    """Give ``node`` of an InCluster pool its own gateway identity: API key, WireGuard keypair,
    index and public address. Returns the instance's id and API key."""
    pool = context.state.pools.get(pool_uid)
    if pool is None:
        raise NodeRefused("the Gateway is gone")
    # Admissions read, extend and write the pool's instance list: one at a time per pool.
    async with context.statuses.lock(GATEWAY, "", pool.name):
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
    digest = context.state.add_gateway_credentials(gid, api_key, (namespace, secret_name))
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
    await context.statuses.write(
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

        def without(found: dict[str, Any], node: str = node) -> dict[str, Any]:
            status = GatewayStatus.model_validate(found)
            return {"instances": [i.model_dump(mode="json", by_alias=True, exclude_none=True)
                                  for i in status.instances if i.name != node]}  # fmt: skip

        await context.statuses.update(GATEWAY, "", pool.name, without)


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    # Nodes carry no finalizer of ours: the watch's DELETED event is the signal.
    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(type: str, name: str, **_: Any) -> None:
        if type == "DELETED":
            await remove_node(context, name)
