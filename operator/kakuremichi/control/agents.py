"""Agent reconciler: quota, addresses, credentials, mirror row, status.

Level-triggered and idempotent: every create, update and resume runs the same
:func:`reconcile`, which reads what exists (status, Secret) before creating anything, so a
restart or a repeated event never allocates twice or rotates keys. An Agent beyond its
namespace's quota (TenantPolicy ``maxAgents``, oldest first) gets no subnet; :func:`readmit`
reconciles it again as soon as the snapshot admits it (an older Agent deleted, a policy
changed), and takes the subnet of one the snapshot no longer admits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any
from uuid import UUID

import kopf

from kakuremichi.api.conditions import Condition, ConditionStatus, set_ready
from kakuremichi.api.fields import status_patch
from kakuremichi.api.resources import AGENT, AgentStatus
from kakuremichi.control.addressing import AllocationConflict, PoolExhausted
from kakuremichi.control.context import Context
from kakuremichi.control.credentials import is_wireguard_key, wireguard_public_key
from kakuremichi.control.credentials_secret import ensure_credentials
from kakuremichi.control.mirror import AgentRow
from kakuremichi.control.ownership import AgentClaim
from kakuremichi.control.reconciler import reconcile_again, register_reconciler
from kakuremichi.control.store import Agent
from kakuremichi.control.topology import AgentNode

log = logging.getLogger(__name__)
READMIT_RETRY_SECONDS = 15.0


def credentials_secret_name(agent_name: str) -> str:
    return f"kakuremichi-agent-{agent_name}"


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    uid, namespace, name = UUID(meta.uid), meta.namespace or "", meta.name or ""
    generation = meta.get("generation")
    current = AgentStatus.model_validate(dict(body.status))

    def ready(status: ConditionStatus, reason: str, message: str) -> list[Condition]:
        return set_ready(current.conditions, status, reason, message, generation)

    context.state.claim_agent(claim_of(meta))
    refusal = context.state.snapshot().agent_refusals.get(uid)
    if refusal is not None:
        # Beyond its namespace's quota: no subnet (a held one goes back to the pool) and no
        # keys known to control, so it cannot starve the other tenants' Agents.
        context.state.refuse_agent(uid)
        await context.mirror.delete_agent(uid)
        patch.status.update(
            status_patch(
                current,
                {
                    "conditions": ready("False", "QuotaExceeded", refusal),
                    "observed_generation": generation,
                    "subnet": None,
                    "virtual_ip": None,
                },
            )
        )
        if not any(c.type == "Ready" and c.reason == "QuotaExceeded" for c in current.conditions):
            await context.kube.announce(AGENT, body, True, "QuotaExceeded", refusal)
        return

    try:
        if current.subnet:
            addresses = context.state.subnets.restore(uid, current.subnet)
        else:
            addresses = context.state.subnets.allocate(uid)
    except (PoolExhausted, AllocationConflict) as error:
        reason = "PoolExhausted" if isinstance(error, PoolExhausted) else "SubnetConflict"
        # A conflict's holder is another tenant's Agent, maybe: it is not named.
        message = (
            str(error)
            if isinstance(error, PoolExhausted)
            else f"subnet {current.subnet} is already allocated to another Agent"
        )
        patch.status.update(
            status_patch(
                current,
                {
                    "conditions": ready("False", reason, message),
                    "observed_generation": generation,
                },
            )
        )
        await context.kube.announce(AGENT, body, True, reason, message)
        raise kopf.TemporaryError(message, delay=15) from error

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
    context.state.add_agent(
        AgentNode(uid, namespace, name, addresses.number, public_key),
        api_key,
        (namespace, secret_name),
    )
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
        await context.kube.announce(AGENT, body, False, "Provisioned", message)
        log.info("agent %s/%s provisioned: %s", namespace, name, message)


async def cleanup(context: Context, body: kopf.Body) -> None:
    meta = body.metadata
    uid, namespace, name = UUID(meta.uid), meta.namespace or "", meta.name or ""
    context.state.remove_agent(uid)
    await context.mirror.delete_agent(uid)
    # (Only the Secret made for this Agent: another of that name is not the operator's.)
    await context.kube.delete_secret(namespace, credentials_secret_name(name), owner_uid=str(uid))
    log.info("agent %s/%s removed; subnet released", namespace, name)


def claim_of(meta: Any) -> AgentClaim:
    created = datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00"))
    return AgentClaim(UUID(meta["uid"]), meta.get("namespace") or "", meta["name"], created)


async def restore_allocations(context: Context) -> set[str]:
    """Before any reconcile runs: record every Agent's claim (quotas count them oldest first)
    and re-register the subnet and keys of each admitted one from status, oldest first: a new
    Agent must never be given a subnet an existing one already holds, and Tunnels must not
    look unserved until their Agent's turn comes. Returns the Agents' uids."""
    agents = await context.kube.list_objects(AGENT, context.settings.namespaces)
    agents.sort(key=lambda a: (a["metadata"]["creationTimestamp"], a["metadata"]["uid"]))
    for agent in agents:
        context.state.claim_agent(claim_of(agent["metadata"]))
    refusals = context.state.snapshot().agent_refusals
    for agent in agents:
        meta, status = agent["metadata"], agent.get("status") or {}
        uid = UUID(meta["uid"])
        subnet = status.get("subnet")
        if not subnet or uid in refusals:
            continue  # (an Agent over quota gives its subnet back when reconciled)
        # A younger claimant of a taken subnet is told so when it is reconciled.
        with contextlib.suppress(AllocationConflict, ValueError):
            addresses = context.state.subnets.restore(uid, subnet)
            public_key = status.get("wireguardPublicKey") or ""
            if is_wireguard_key(public_key):
                node = AgentNode(uid, meta.get("namespace") or "", meta["name"],
                                 addresses.number, public_key)  # fmt: skip
                context.state.restore_agent(node)
    pruned = await context.mirror.prune(Agent, {UUID(a["metadata"]["uid"]) for a in agents})
    if pruned:
        log.info("pruned %d agent rows of deleted Agents", pruned)
    return {str(a["metadata"]["uid"]) for a in agents}


async def readmit(context: Context) -> None:
    """Reconcile again each Agent whose admission changed in the snapshot: one over quota that
    now fits (an older one was deleted, a policy raised its limit), or one provisioned that no
    longer does (a policy lowered it). One that fails (the pool is full, say) is tried again
    after :data:`READMIT_RETRY_SECONDS`, not at every change."""
    state, seen = context.state, -1
    loop = asyncio.get_running_loop()
    retry_at: dict[UUID, float] = {}
    while True:
        wait = min(retry_at.values(), default=loop.time() + 3600.0) - loop.time()
        with contextlib.suppress(TimeoutError):
            seen = await asyncio.wait_for(state.changed(seen), max(0.0, wait))
        await asyncio.sleep(0.05)  # let a burst settle
        refusals, now = state.snapshot().agent_refusals, loop.time()
        needed = {
            uid
            for uid in state.agent_claims
            if (uid in refusals and uid in state.agents)  # over quota now: subnet back
            or (uid not in refusals and uid in state.quota_refused)  # fits now
        }
        for settled in set(retry_at) - needed:  # (fine now, or gone: no more waking for it)
            del retry_at[settled]
        changed = [state.agent_claims[uid] for uid in needed if retry_at.get(uid, 0.0) <= now]
        for claim in changed:
            try:
                await reconcile_again(context, AGENT, reconcile, claim.namespace, claim.name)
                retry_at.pop(claim.id, None)
            except Exception as error:
                retry_at[claim.id] = loop.time() + READMIT_RETRY_SECONDS
                log.warning("Agent %s/%s: %s; trying again in %.0fs", claim.namespace,
                            claim.name, error, READMIT_RETRY_SECONDS)  # fmt: skip


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    register_reconciler(registry, context, AGENT, reconcile, cleanup)
