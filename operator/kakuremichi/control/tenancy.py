"""TenantPolicies and namespace labels: the facts the ownership decision reads about tenants.

Each TenantPolicy becomes a :class:`~kakuremichi.control.ownership.TenantRule` in the state; the
namespaces' labels are followed because policies select by them. Nothing is decided here: the
snapshot decides (:mod:`kakuremichi.control.ownership`). A policy the operator cannot read still
counts as a policy that grants nothing, so a typo never opens the cluster to first-claim-wins.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kakuremichi.api.conditions import ConditionStatus, set_ready
from kakuremichi.api.fields import describe_errors, status_patch
from kakuremichi.api.resources import TENANT_POLICY, TenantPolicySpec, TenantPolicyStatus
from kakuremichi.control.context import Context
from kakuremichi.control.ownership import TenantRule
from kakuremichi.control.reconciler import register_reconciler

log = logging.getLogger(__name__)


def rule_of(name: str, spec: dict[str, Any]) -> tuple[TenantRule, str | None]:
    """The policy's rule, and why it cannot be read (then it grants nothing)."""
    try:
        return TenantRule.from_spec(name, TenantPolicySpec.model_validate(spec)), None
    except ValidationError as error:
        return TenantRule(name), "; ".join(f"spec.{line}" for line in describe_errors(error))


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    name = meta.name or ""
    rule, problem = rule_of(name, dict(body.spec))
    context.state.set_tenant_rule(rule)
    current = TenantPolicyStatus.model_validate(dict(body.status))
    status: ConditionStatus = "True" if problem is None else "False"
    if problem is None:
        reason, message = "Accepted", "applied to the namespaces it selects"
    else:
        reason, message = "Invalid", f"{problem}; until fixed it grants nothing"
        await context.kube.announce(TENANT_POLICY, body, True, reason, message)
    conditions = set_ready(current.conditions, status, reason, message, meta.get("generation"))
    patch.status.update(
        status_patch(
            current, {"conditions": conditions, "observed_generation": meta.get("generation")}
        )
    )


async def cleanup(context: Context, body: kopf.Body) -> None:
    context.state.remove_tenant_rule(body.metadata.name or "")


async def restore(context: Context) -> set[str]:
    """Every policy and namespace label before any reconcile: the first decisions after a
    start must already see them (an Agent over quota must not get a subnet meanwhile).
    Returns the policies' names."""
    try:
        policies = await context.kube.list_objects(TENANT_POLICY)
    except ApiException as error:
        if error.status != 404:
            raise
        # (Helm installs CRDs only on first install: after an upgrade apply crds/ by hand.)
        log.warning("the TenantPolicy CRD is not installed: no policies apply")
        policies = []
    for found in policies:
        rule, _ = rule_of(found["metadata"]["name"], found.get("spec") or {})
        context.state.set_tenant_rule(rule)
    restored = {rule.name for rule in context.state.tenant_rules.values()}
    for namespace, labels in (await context.kube.namespace_labels()).items():
        context.state.set_namespace_labels(namespace, labels)
    return restored


async def forget_vanished(context: Context, restored: set[str]) -> None:
    """Like :func:`kakuremichi.control.tunnels.forget_vanished`, for TenantPolicies."""
    try:
        listed = {
            found["metadata"]["name"] for found in await context.kube.list_objects(TENANT_POLICY)
        }
    except ApiException as error:
        if error.status != 404:
            raise
        listed = set()
    for vanished in (restored & set(context.state.tenant_rules)) - listed:
        context.state.remove_tenant_rule(vanished)


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    # No finalizer: all a deletion concerns is the in-memory state, rebuilt on every start.
    register_reconciler(registry, context, TENANT_POLICY, reconcile, cleanup, finalizer=False)

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(type: str, name: str, labels: kopf.Labels, **_: Any) -> None:
        context.state.set_namespace_labels(name, None if type == "DELETED" else dict(labels))
