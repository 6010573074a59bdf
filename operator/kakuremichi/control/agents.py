"""Agent reconciler: addresses, credentials, mirror row, status.

Level-triggered and idempotent: every create, update and resume runs the same
:func:`reconcile`, which reads what exists (status, Secret) before creating anything, so a
restart or a repeated event never allocates twice or rotates keys.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from uuid import UUID

import kopf

from kakuremichi.addressing import AllocationConflict, PoolExhausted
from kakuremichi.conditions import Condition, ConditionStatus, set_ready
from kakuremichi.control.context import Context
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.mirror import AgentRow
from kakuremichi.control.reconciler import register_reconciler
from kakuremichi.credentials import wireguard_public_key
from kakuremichi.edge_config import AgentNode
from kakuremichi.fields import status_patch
from kakuremichi.resources import AGENT, AgentStatus
from kakuremichi.store import Agent

log = logging.getLogger(__name__)


def credentials_secret_name(agent_name: str) -> str:
    return f"kakuremichi-agent-{agent_name}"


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    uid, namespace, name = UUID(meta.uid), meta.namespace or "", meta.name or ""
    generation = meta.get("generation")
    current = AgentStatus.model_validate(dict(body.status))

    def ready(status: ConditionStatus, reason: str, message: str) -> list[Condition]:
        return set_ready(current.conditions, status, reason, message, generation)

    try:
        if current.subnet:
            addresses = context.state.subnets.restore(uid, current.subnet)
        else:
            addresses = context.state.subnets.allocate(uid)
    except (PoolExhausted, AllocationConflict) as error:
        reason = "PoolExhausted" if isinstance(error, PoolExhausted) else "SubnetConflict"
        patch.status.update(
            status_patch(
                current,
                {
                    "conditions": ready("False", reason, str(error)),
                    "observed_generation": generation,
                },
            )
        )
        kopf.warn(body, reason=reason, message=str(error))
        raise kopf.TemporaryError(str(error), delay=15) from error

    secret_name = credentials_secret_name(name)
    api_key, private_key = await ensure_credentials(
        context.kube, namespace, secret_name, "agent", body, {"kakuremichi.io/agent": name}
    )
    public_key = wireguard_public_key(private_key)
    # The row first: once the state knows the agent, its tunnels' rows may reference it.
    await context.mirror.upsert_agent(
        AgentRow(
            id=uid,
            name=name,
            namespace=namespace,
            api_key_digest=context.state.sealer.digest_api_key(api_key),
            wireguard_public_key=public_key,
            virtual_ip=str(addresses.virtual_ip),
            subnet=str(addresses.subnet),
        )
    )
    context.state.add_agent(AgentNode(uid, namespace, name, addresses.number, public_key), api_key)
    context.state.credential_secrets[uid] = (namespace, secret_name)
    message = f"subnet {addresses.subnet}, virtual IP {addresses.virtual_ip}"
    updates: dict[str, Any] = {
        "subnet": str(addresses.subnet),
        "virtual_ip": str(addresses.virtual_ip),
        "wireguard_public_key": public_key,
        "credentials_secret": secret_name,
        "observed_generation": generation,
        "conditions": ready("True", "Provisioned", message),
    }
    if uid not in context.presence.online:  # e.g. "online" left over from before a restart
        updates["state"] = "offline"
    patch.status.update(status_patch(current, updates))
    if current.subnet != str(addresses.subnet):
        kopf.info(body, reason="Provisioned", message=message)
        log.info("agent %s/%s provisioned: %s", namespace, name, message)


async def cleanup(context: Context, body: kopf.Body) -> None:
    meta = body.metadata
    uid, namespace, name = UUID(meta.uid), meta.namespace or "", meta.name or ""
    context.state.remove_agent(uid)
    await context.mirror.delete_agent(uid)
    await context.kube.delete_secret(namespace, credentials_secret_name(name))
    log.info("agent %s/%s removed; subnet released", namespace, name)


async def restore_allocations(context: Context) -> set[str]:
    """Re-register every Agent's subnet from status, oldest first, before any reconcile runs:
    a new Agent must never be given a subnet an existing one already holds. Returns the
    Agents' uids."""
    agents = await context.kube.list_objects(AGENT, context.settings.namespaces)
    agents.sort(key=lambda a: (a["metadata"]["creationTimestamp"], a["metadata"]["uid"]))
    for agent in agents:
        subnet = (agent.get("status") or {}).get("subnet")
        if subnet:
            # A younger claimant of a taken subnet is told so when it is reconciled.
            with contextlib.suppress(AllocationConflict):
                context.state.subnets.restore(UUID(agent["metadata"]["uid"]), subnet)
    pruned = await context.mirror.prune(Agent, {UUID(a["metadata"]["uid"]) for a in agents})
    if pruned:
        log.info("pruned %d agent rows of deleted Agents", pruned)
    return {str(a["metadata"]["uid"]) for a in agents}


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    register_reconciler(registry, context, AGENT, reconcile, cleanup)
