"""The Ingress controller: Ingresses of class ``kakuremichi`` served through the cluster agent
(``--cluster-agent``), a thin shell around :mod:`kakuremichi.control.route_sources`.

Watches feed the sources (Ingresses, IngressClasses, Services, EndpointSlices, and the
addresses of pods and nodes); one task decides from them and projects the decision: each
Ingress's host claims and each backend's endpoints into the state (where they weigh against
Tunnels' claims in the one ownership decision), a Certificate per claimed host owned by the
Ingress (``spec.tls[].secretName`` read as it is, else ACME), ``status.loadBalancer`` (the
gateways' addresses, once the Ingress holds a host) and Events that say, per field and per host,
what is not served and why.

When each host's claim began is kept in a ConfigMap of the operator's namespace, which no tenant
writes: an annotation on the Ingress could be kept from an earlier claim and restored later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import kopf
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import API_VERSION, CERTIFICATE
from kakuremichi.control.context import Context
from kakuremichi.control.kube_api import (
    ENDPOINT_SLICE,
    INGRESS,
    INGRESS_CLASS,
    MANAGED_BY,
    NODE,
    POD,
    SERVICE,
)
from kakuremichi.control.route_sources import IngressDecision, Key, RouteDecision, RouteSources
from kakuremichi.control.snapshot import Snapshot

CLAIMS_CONFIG_MAP = "kakuremichi-route-claims"
"""Claim id → when the operator first saw that host in that Ingress (ISO 8601)."""
MAX_PROBLEM_EVENTS = 10
"""Per Ingress and change; more are summed up in one."""
SETTLE_SECONDS = 0.1
RETRY_SECONDS = 5.0
log = logging.getLogger(__name__)


class IngressController:
    def __init__(self, context: Context, cluster_agent: Key) -> None:
        self.context = context
        allowed = tuple(ipaddress.ip_network(r) for r in context.settings.endpoint_ranges)
        self.sources = RouteSources(cluster_agent, context.settings.system_namespace, allowed)
        self.news = asyncio.Event()
        self.seen: dict[UUID, datetime] = {}
        self.saved: dict[UUID, datetime] | None = None
        self.decision = RouteDecision()
        self.applied: set[str] = set()
        """Sources whose claims are in the state."""
        self.made: dict[Key, set[str]] = {}
        """Ingress → the Certificates made for it."""
        self.certificates: dict[Key, dict[str, Any]] = {}
        """(namespace, Certificate) → its spec as last written or seen."""
        self.balancers: dict[Key, list[dict[str, str]]] = {}
        """Ingress → ``status.loadBalancer.ingress`` as last written or seen."""
        self.told_problems: dict[Key, tuple[str, ...]] = {}
        self.told_hosts: dict[UUID, tuple[str, str]] = {}

    def heard(self, changed: bool) -> None:
        if changed:
            self.news.set()

    def saw_ingress(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        balancer = ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        self.balancers[key] = [dict(b) for b in balancer if isinstance(b, Mapping)]
        self.heard(self.sources.saw_ingress(body))

    def ingress_gone(self, namespace: str, name: str) -> None:
        self.balancers.pop((namespace, name), None)
        self.told_problems.pop((namespace, name), None)
        self.heard(self.sources.ingress_gone(namespace, name))

    async def restore(self) -> None:
        """Before any decision (and any edge's config): every Ingress's claims, dated as the
        last run dated them, so that no younger claim is served meanwhile."""
        kube, settings = self.context.kube, self.context.settings
        for body in await kube.list_builtin(INGRESS_CLASS):
            self.sources.saw_class(body)
        for body in await kube.list_builtin(SERVICE):
            self.sources.saw_service(body)
        for body in await kube.list_builtin(INGRESS):
            self.saw_ingress(body)
        # Whose each address is, before any endpoint is given out.
        for body in await kube.list_builtin(POD):
            self.sources.saw_pod(body)
        for body in await kube.list_builtin(NODE):
            self.sources.saw_node(body)
        for body in await kube.list_builtin(ENDPOINT_SLICE):
            self.sources.saw_slice(body)
        stored = await kube.read_config_map(settings.system_namespace, CLAIMS_CONFIG_MAP)
        self.seen = _dates(stored or {})
        self.saved = dict(self.seen)
        async for page in kube.pages(CERTIFICATE):
            for body in page:
                meta = body.get("metadata") or {}
                for owner in meta.get("ownerReferences") or ():
                    if (
                        owner.get("kind") == "Ingress"
                        and owner.get("apiVersion") == INGRESS.api_version
                    ):
                        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
                        self.made.setdefault((namespace, owner.get("name") or ""), set()).add(name)
                        self.certificates[(namespace, name)] = dict(body.get("spec") or {})
        self.decide()

    def decide(self) -> None:
        """Decide from the sources, and put the claims and endpoints into the state."""
        self.news.clear()
        now = datetime.now(UTC)
        self.decision = self.sources.decide(self.seen, now)
        self.seen = {claim: self.seen.get(claim, now) for claim in self.decision.claims()}
        state = self.context.state
        current = {d.source for d in self.decision.ingresses.values()}
        for source in self.applied - current:
            state.set_route_claims(source, ())
        for decided in self.decision.ingresses.values():
            state.set_route_claims(decided.source, decided.claims)
        self.applied = current
        for backend in set(state.endpoints) - set(self.decision.endpoints):
            state.set_endpoints(backend, None)
        for backend, endpoints in self.decision.endpoints.items():
            state.set_endpoints(backend, endpoints)

    async def run(self) -> None:
        generation = -1
        while True:
            wait = None
            try:
                if self.news.is_set():
                    self.decide()
                if not await self.project(self.context.state.snapshot()):
                    wait = RETRY_SECONDS
            except Exception:  # the next pass tries again
                log.exception("serving Ingresses failed; trying again")
                wait = RETRY_SECONDS
            generation = await self._next(generation, patience=wait)

    async def _next(self, generation: int, patience: float | None) -> int:
        """Until the sources or the state change (or ``patience`` runs out), then a moment to
        settle."""
        waits = {
            asyncio.ensure_future(self.context.state.changed(generation)),
            asyncio.ensure_future(self.news.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        await asyncio.sleep(SETTLE_SECONDS)
        return self.context.state.generation

    async def project(self, snapshot: Snapshot) -> bool:
        """The decision, into the cluster: only what differs from what was written. An Ingress
        whose writes fail (its namespace being deleted, say) is tried again at the next pass,
        and holds back no other; False when one failed."""
        done = True
        for key, decided in self.decision.ingresses.items():
            try:
                await self._certificates(key, decided)
                await self._balancer(key, decided, snapshot)
                await self._tell(key, decided, snapshot)
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("writing what Ingress %s/%s is served as failed: %s", *key, error)
        for key in set(self.made) - set(self.decision.ingresses):
            try:
                await self._certificates(key, None)  # (no longer ours, or gone)
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("removing Ingress %s/%s's Certificates failed: %s", *key, error)
        live = {c for d in self.decision.ingresses.values() for c in (x.id for x in d.claims)}
        for gone in set(self.told_hosts) - live:
            del self.told_hosts[gone]
        await self._save_dates(snapshot)
        return done

    async def _save_dates(self, snapshot: Snapshot) -> None:
        """When each claim began as the ownership decision dated it: only claims it allowed (one
        refused for a quota or a policy begins when allowed, and must not come back from a
        restart with the date it was first seen)."""
        ownership = snapshot.ownership
        dates = {
            claim: ownership.claims[claim]
            for claim in self.decision.claims()
            if claim in ownership.claims and claim not in ownership.unable
        }
        if dates == self.saved:
            return
        data = {str(claim): when.isoformat() for claim, when in sorted(dates.items())}
        await self.context.kube.write_config_map(
            self.context.settings.system_namespace, CLAIMS_CONFIG_MAP, data, MANAGED_BY
        )
        self.saved = dates

    async def _certificates(self, key: Key, decided: IngressDecision | None) -> None:
        kube, namespace = self.context.kube, key[0]
        wanted = {} if decided is None else decided.certificates
        for name, spec in wanted.items():
            body = spec.model_dump(mode="json", by_alias=True)
            if self.certificates.get((namespace, name)) == body:
                continue
            assert decided is not None
            existing = await kube.get_object(CERTIFICATE, namespace, name)
            if existing is not None and not _owned(existing, decided.uid):
                # (someone else's of that name, a Tunnel's say: never touched)
                if self.certificates.get((namespace, name)) != {"taken": True}:
                    self.certificates[(namespace, name)] = {"taken": True}
                    await kube.announce(INGRESS, _reference(decided), True, "CertificateNameTaken",
                                        f"{spec.domain}: Certificate {name} of this namespace is "
                                        "not this Ingress's; rename or delete it.")  # fmt: skip
                continue
            if existing is not None and existing["spec"].get("domain") != body["domain"]:
                await kube.delete_object(CERTIFICATE, namespace, name)  # (domain is immutable)
                existing = None
            if existing is None:
                await kube.create_object(CERTIFICATE, namespace, _certificate(decided, name, body))
            elif {k: existing["spec"].get(k) for k in body} != body:
                await kube.patch_object(CERTIFICATE, namespace, name, {"spec": body})
            self.certificates[(namespace, name)] = body
            self.made.setdefault(key, set()).add(name)
        for name in sorted(self.made.get(key, set()) - set(wanted)):
            existing = await kube.get_object(CERTIFICATE, namespace, name)
            if existing is not None and (
                _owned(existing, decided.uid) if decided is not None
                else _owned(existing, name=key[1])
            ):  # fmt: skip
                await kube.delete_object(CERTIFICATE, namespace, name)
            self.certificates.pop((namespace, name), None)
            self.made[key].discard(name)
        if not self.made.get(key):
            self.made.pop(key, None)

    async def _balancer(self, key: Key, decided: IngressDecision, snapshot: Snapshot) -> None:
        """The gateways' addresses, once the Ingress holds a host (so that external-dns, say,
        points no name at them for a host someone else holds)."""
        holders = snapshot.ownership.holders
        holds = any(getattr(holders.get(c.domain), "id", None) == c.id for c in decided.claims)
        addresses = sorted({g.public_ip for g in snapshot.facts.gateways.values()}) if holds else []
        wanted = [{"ip": address} for address in addresses]
        if self.balancers.get(key) == wanted:
            return
        status = {"loadBalancer": {"ingress": wanted}}
        if await self.context.kube.patch_builtin_status(INGRESS, *key, status):
            self.balancers[key] = wanted

    async def _tell(self, key: Key, decided: IngressDecision, snapshot: Snapshot) -> None:
        """Events: each field that cannot be served, once; each host's verdict when it moves."""
        kube = self.context.kube
        body = _reference(decided)
        told = self.told_problems.get(key, ())
        if decided.problems != told:
            new = [problem for problem in decided.problems if problem not in told]
            for problem in new[:MAX_PROBLEM_EVENTS]:
                await kube.announce(INGRESS, body, True, "RouteRefused", problem)
            if len(new) > MAX_PROBLEM_EVENTS:
                await kube.announce(INGRESS, body, True, "RouteRefused",
                                    f"and {len(new) - MAX_PROBLEM_EVENTS} more fields are not "
                                    "served.")  # fmt: skip
            self.told_problems[key] = decided.problems
        for claim in decided.claims:
            verdict = snapshot.route_verdicts.get(claim.id)
            if verdict is None or self.told_hosts.get(claim.id) == (verdict.status, verdict.reason):
                continue
            if verdict.reason == "CertificatePending" and claim.id not in self.told_hosts:
                continue  # (its Certificate's first look is a moment away)
            serving = verdict.status == "True"
            message = f"{claim.domain}: {verdict.message}"
            await kube.announce(INGRESS, body, not serving, verdict.reason, message)
            self.told_hosts[claim.id] = (verdict.status, verdict.reason)


def _certificate(decided: IngressDecision, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": CERTIFICATE.kind,
        "metadata": {
            "name": name,
            "labels": dict(MANAGED_BY),
            "ownerReferences": [
                {
                    "apiVersion": INGRESS.api_version,
                    "kind": INGRESS.kind,
                    "name": decided.name,
                    "uid": decided.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def _terminating(error: Exception) -> bool:
    """Refused because the namespace is being deleted (nothing to write there any more)."""
    return isinstance(error, ApiException) and "NamespaceTerminating" in str(error.body or "")


def _reference(decided: IngressDecision) -> dict[str, Any]:
    return {"metadata": {"namespace": decided.namespace, "name": decided.name, "uid": decided.uid}}


def _owned(certificate: Mapping[str, Any], uid: str = "", *, name: str = "") -> bool:
    """Made for the Ingress of that uid (or, once it is gone, of that name)."""
    owners = (certificate.get("metadata") or {}).get("ownerReferences") or ()
    return any(
        o.get("kind") == INGRESS.kind and o.get("apiVersion") == INGRESS.api_version
        and (o.get("uid") == uid if uid else o.get("name") == name)
        for o in owners
    )  # fmt: skip


def _dates(stored: Mapping[str, str]) -> dict[UUID, datetime]:
    found = {}
    for claim, when in stored.items():
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(when)
            found[UUID(claim)] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return found


def register(registry: kopf.OperatorRegistry, context: Context) -> IngressController | None:
    """The watches, when ``--cluster-agent`` is given (None otherwise)."""
    agent = context.settings.cluster_agent_key()
    if agent is None:
        return None
    controller = IngressController(context, agent)
    sources = controller.sources

    @kopf.on.event(INGRESS.group, INGRESS.version, INGRESS.plural, registry=registry)
    async def ingress_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            controller.ingress_gone(body.metadata.namespace or "", body.metadata.name or "")
        else:
            controller.saw_ingress(body)

    @kopf.on.event(INGRESS_CLASS.group, INGRESS_CLASS.version, INGRESS_CLASS.plural,
                   registry=registry)  # fmt: skip
    async def class_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        gone = type == "DELETED"
        name = body.metadata.name or ""
        controller.heard(sources.class_gone(name) if gone else sources.saw_class(body))

    @kopf.on.event(SERVICE.group, SERVICE.version, SERVICE.plural, registry=registry)
    async def service_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        gone = type == "DELETED"
        controller.heard(sources.service_gone(*key) if gone else sources.saw_service(body))

    @kopf.on.event(ENDPOINT_SLICE.group, ENDPOINT_SLICE.version, ENDPOINT_SLICE.plural,
                   registry=registry)  # fmt: skip
    async def slice_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        gone = type == "DELETED"
        controller.heard(sources.slice_gone(*key) if gone else sources.saw_slice(body))

    @kopf.on.event(POD.group, POD.version, POD.plural, registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        gone = type == "DELETED"
        controller.heard(sources.pod_gone(*key) if gone else sources.saw_pod(body))

    @kopf.on.event(NODE.group, NODE.version, NODE.plural, registry=registry)
    async def node_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        name = body.metadata.name or ""
        controller.heard(sources.node_gone(name) if type == "DELETED" else sources.saw_node(body))

    return controller
