"""The route controller: Ingresses of class ``kakuremichi``, and Gateway API Gateways,
HTTPRoutes and TLSRoutes of a GatewayClass of ours, served through the cluster agent
(``--cluster-agent``); a thin shell around :mod:`kakuremichi.control.route_sources`.

Watches feed the sources (Ingresses, IngressClasses, the Gateway API's kinds, namespaces,
Services, EndpointSlices, and the addresses of pods and nodes); one task decides from them (in a
thread, from a copy) and projects the decision: each
Ingress's host claims and each backend's endpoints into the state (where they weigh against
Tunnels' claims in the one ownership decision), a Certificate per claimed host owned by the
Ingress (``spec.tls[].secretName`` read as it is, else ACME), ``status.loadBalancer`` (the
gateways' addresses, once the Ingress holds a host) and Events that say, per field and per host,
what is not served and why. For the Gateway API: statuses (GatewayClass, Gateway and its
listeners, each route's parents of ours, read and replaced under its resourceVersion), a
Certificate per HTTP host owned by the Gateway that gives it, and the same Events on routes.

When each host's claim began is kept in a ConfigMap of the operator's namespace, which no tenant
writes: an annotation on the Ingress could be kept from an earlier claim and restored later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import kopf
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import API_VERSION, CERTIFICATE, GROUP, VERSION, CertificateSpec
from kakuremichi.control import gateway_api_status
from kakuremichi.control.context import Context
from kakuremichi.control.gateway_api import ALL_ROUTE_KINDS, GatewayDecision
from kakuremichi.control.gateway_api import RouteDecision as HTTPRouteDecision
from kakuremichi.control.kube_api import (
    ENDPOINT_SLICE,
    GATEWAY_API_KINDS,
    GATEWAY_CLASS,
    INGRESS,
    INGRESS_CLASS,
    MANAGED_BY,
    NAMESPACE,
    NODE,
    POD,
    REFERENCE_GRANT,
    ROUTED_GATEWAY,
    SERVICE,
    BuiltinKind,
)
from kakuremichi.control.ownership import TunnelFacts
from kakuremichi.control.route_sources import IngressDecision, Key, RouteDecision, RouteSources
from kakuremichi.control.snapshot import Snapshot

Owner = tuple[str, str, str]
"""(kind, namespace, name)."""
ROUTE_KINDS = {kind.kind: kind for kind in GATEWAY_API_KINDS if kind.kind in ALL_ROUTE_KINDS}
"""The route kinds the decision reads, as the API names them."""
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
        self.made: dict[Owner, set[Key]] = {}
        """(kind, namespace, name) of an Ingress or Gateway → the Certificates made for it."""
        self.certificates: dict[Key, dict[str, Any]] = {}
        """(namespace, Certificate) → its spec as last written or seen."""
        self.balancers: dict[Key, list[dict[str, str]]] = {}
        """Ingress → ``status.loadBalancer.ingress`` as last written or seen."""
        self.told_problems: dict[Owner, tuple[str, ...]] = {}
        self.told_hosts: dict[UUID, tuple[str, str]] = {}
        self.restored: dict[str, set[Key]] = {}
        """Kind → the objects listed at the start (those :meth:`forget_vanished` checks)."""
        self.statuses: dict[Owner, dict[str, Any]] = {}
        """(kind, namespace, name) of a Gateway API object → its status as last written or seen."""

    def heard(self, changed: bool) -> None:
        if changed:
            self.news.set()

    def saw_ingress(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        balancer = ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        self.balancers[key] = [dict(b) for b in balancer if isinstance(b, Mapping)]
        self.restored.get(INGRESS.kind, set()).discard(key)  # (the watch has it now)
        self.heard(self.sources.saw_ingress(body))

    def ingress_gone(self, namespace: str, name: str) -> None:
        self.balancers.pop((namespace, name), None)
        self.told_problems.pop((INGRESS.kind, namespace, name), None)
        self.restored.get(INGRESS.kind, set()).discard((namespace, name))
        self.heard(self.sources.ingress_gone(namespace, name))

    def certificate_gone(self, namespace: str, name: str) -> None:
        """A Certificate was deleted: one of ours is made again at the next pass (what was
        written is no longer there)."""
        if self.certificates.pop((namespace, name), None) is not None:
            self.news.set()

    def saw_gateway_api(self, kind: BuiltinKind, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        owner = (kind.kind, meta.get("namespace") or "", meta.get("name") or "")
        status = body.get("status")
        self.statuses[owner] = dict(status) if isinstance(status, Mapping) else {}
        self.restored.get(kind.kind, set()).discard(owner[1:])  # (the watch has it now)
        sources = self.sources
        if kind.kind in ROUTE_KINDS:
            self.heard(sources.saw_route(kind.kind, body))
            return
        saw = {
            GATEWAY_CLASS.kind: sources.saw_gateway_class, ROUTED_GATEWAY.kind: sources.saw_gateway,
            REFERENCE_GRANT.kind: sources.saw_grant,
        }[kind.kind]  # fmt: skip
        self.heard(saw(body))

    def gateway_api_gone(self, kind: BuiltinKind, namespace: str, name: str) -> None:
        self.statuses.pop((kind.kind, namespace, name), None)
        self.told_problems.pop((kind.kind, namespace, name), None)
        self.restored.get(kind.kind, set()).discard((namespace, name))
        sources = self.sources
        if kind is GATEWAY_CLASS:
            self.heard(sources.gateway_class_gone(name))
            return
        if kind.kind in ROUTE_KINDS:
            self.heard(sources.route_gone(kind.kind, namespace, name))
            return
        gone = {
            ROUTED_GATEWAY.kind: sources.gateway_gone, REFERENCE_GRANT.kind: sources.grant_gone,
        }[kind.kind]  # fmt: skip
        self.heard(gone(namespace, name))

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
            self.restored.setdefault(INGRESS.kind, set()).add(_key_of(body))
        for body in await kube.list_builtin(NAMESPACE):
            self.sources.saw_namespace(body)
        for kind in (GATEWAY_CLASS, REFERENCE_GRANT, ROUTED_GATEWAY, *ROUTE_KINDS.values()):
            try:
                found = await kube.list_builtin(kind)
            except ApiException as error:
                if error.status != 404:
                    raise
                continue  # (the Gateway API's CRDs are not installed)
            for body in found:
                self.saw_gateway_api(kind, body)
                self.restored.setdefault(kind.kind, set()).add(_key_of(body))
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
                namespace, name = meta.get("namespace") or "", meta.get("name") or ""
                for made_for in _made_for(meta):
                    self.made.setdefault(made_for, set()).add((namespace, name))
                    self.certificates[(namespace, name)] = dict(body.get("spec") or {})
        self.decide()

    async def forget_vanished(self) -> None:
        """Ingresses and Gateway API objects have no finalizer: one deleted between the start's
        listing and the first watch sends no event, and would keep its claims. Drop those
        listed at the start that are no longer listed (only those: one created since may be
        missing from this listing)."""
        kube = self.context.kube
        for kind in (INGRESS, GATEWAY_CLASS, REFERENCE_GRANT, ROUTED_GATEWAY,
                     *ROUTE_KINDS.values()):  # fmt: skip
            restored = self.restored.get(kind.kind, set())
            if not restored:
                continue
            listed = {_key_of(body) for body in await kube.list_builtin(kind)}
            for namespace, name in sorted(restored - listed):
                log.info("%s %s/%s was deleted meanwhile: forgotten", kind.kind, namespace, name)
                if kind is INGRESS:
                    self.ingress_gone(namespace, name)
                else:
                    self.gateway_api_gone(kind, namespace, name)
            self.restored[kind.kind] = restored & listed

    def decide(self) -> None:
        """Decide from the sources, and put the claims and endpoints into the state."""
        self.news.clear()
        now = datetime.now(UTC)
        self._apply(self.sources.decide(self.seen, now), now)

    async def decide_off_the_loop(self) -> None:
        """:meth:`decide`, the decision itself in a thread (seconds, for a cluster of 10,000
        hosts: the watches and the edges' connections go on meanwhile), from a copy of the
        sources as they are now; what arrives meanwhile makes the next one."""
        self.news.clear()
        now = datetime.now(UTC)
        sources, seen = self.sources.copy(), dict(self.seen)
        self._apply(await asyncio.to_thread(sources.decide, seen, now), now)

    def _apply(self, decision: RouteDecision, now: datetime) -> None:
        self.decision = decision
        self.seen = {claim: self.seen.get(claim, now) for claim in self.decision.claims()}
        state = self.context.state
        sets = self.decision.claim_sets()
        for source in self.applied - set(sets):
            state.set_route_claims(source, ())
        for source, claims in sets.items():
            state.set_route_claims(source, claims)
        self.applied = set(sets)
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
                    await self.decide_off_the_loop()
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
                certificates = {(key[0], n): spec for n, spec in decided.certificates.items()}
                await self._certificates(INGRESS, key, decided.uid, certificates)
                await self._balancer(key, decided, snapshot)
                await self._tell(INGRESS, key, decided, decided.problems, decided.claims, snapshot)
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("writing what Ingress %s/%s is served as failed: %s", *key, error)
        done = await self._project_gateway_api(snapshot) and done
        wanted = {(INGRESS.kind, *key) for key in self.decision.ingresses}
        wanted |= {(ROUTED_GATEWAY.kind, *key) for key in self.decision.gateway_api.gateways}
        for owner in set(self.made) - wanted:
            kind = INGRESS if owner[0] == INGRESS.kind else ROUTED_GATEWAY
            try:
                await self._certificates(kind, owner[1:], None, {})  # (no longer ours, or gone)
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("removing %s %s/%s's Certificates failed: %s", *owner, error)
        live = set(self.decision.claims())
        for gone in set(self.told_hosts) - live:
            del self.told_hosts[gone]
        await self._save_dates(snapshot)
        return done

    async def _project_gateway_api(self, snapshot: Snapshot) -> bool:
        """Statuses of the GatewayClasses, Gateways and routes of ours, the Gateways'
        Certificates, and Events on routes; False when a write failed."""
        decided = self.decision.gateway_api
        now = datetime.now(UTC)
        done = True
        writes: list[tuple[BuiltinKind, Key, Any]] = []
        for name, of_class in decided.classes.items():
            previous = self.statuses.get((GATEWAY_CLASS.kind, "", name), {})
            status = gateway_api_status.class_status(of_class, previous, now)
            writes.append((GATEWAY_CLASS, ("", name), status))
        for key, gateway in decided.gateways.items():
            previous = self.statuses.get((ROUTED_GATEWAY.kind, *key), {})
            status = gateway_api_status.gateway_status(
                gateway, _pool_addresses(snapshot, gateway), previous, now
            )
            writes.append((ROUTED_GATEWAY, key, status))
        # A route's parents: ours, and those of routes no longer attached (entries of ours
        # that would say Accepted of a Gateway that is gone) taken away.
        routes: dict[Owner, HTTPRouteDecision | None] = {
            owner: None
            for owner, status in self.statuses.items()
            if owner[0] in ROUTE_KINDS and gateway_api_status.has_ours(status)
        }
        for kind_name, of_kind in decided.routes.items():
            routes.update({(kind_name, *key): d for key, d in of_kind.items()})
        for owner, route in routes.items():
            previous = self.statuses.get(owner, {})
            status = gateway_api_status.route_status(route, previous, now)
            writes.append((ROUTE_KINDS[owner[0]], (owner[1], owner[2]), status))
        for kind, key, status in writes:
            owner = (kind.kind, *key)
            previous = self.statuses.get(owner, {})
            if gateway_api_status.without_times(
                {k: previous.get(k) for k in status}
            ) == gateway_api_status.without_times(status):
                continue
            try:
                if kind.kind in ROUTE_KINDS:  # (others write their parents: read, then edit)
                    edit = _route_edit(routes[owner], now)
                    written = await self.context.kube.edit_builtin_status(kind, *key, edit)
                    if written is None:
                        self.statuses.pop(owner, None)
                    else:
                        self.statuses[owner] = written
                elif await self.context.kube.patch_builtin_status(kind, *key, status):
                    self.statuses[owner] = {**previous, **status}
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("writing the status of %s %s/%s failed: %s", *owner, error)
        for key, gateway in decided.gateways.items():
            try:
                await self._certificates(ROUTED_GATEWAY, key, gateway.uid, gateway.certificates)
            except Exception as error:
                done = False
                if not _terminating(error):
                    log.warning("writing Gateway %s/%s's Certificates failed: %s", *key, error)
        claims_of: dict[Owner, list[Any]] = {}
        for claims in decided.claims.values():
            for claim in claims:
                kind_name = (claim.source or "").split(" ", 1)[0]
                claims_of.setdefault((kind_name, claim.namespace, claim.name), []).append(claim)
        for kind_name, decided_routes in decided.routes.items():
            route_kind = ROUTE_KINDS[kind_name]
            for key, route in decided_routes.items():
                try:
                    await self._tell(
                        route_kind,
                        key,
                        route,
                        route.problems,
                        claims_of.get((route_kind.kind, *key), ()),
                        snapshot,
                    )
                except Exception as error:
                    done = False
                    if not _terminating(error):
                        log.warning("telling %s %s/%s's problems failed: %s", route_kind.kind,
                                    *key, error)  # fmt: skip
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

    async def _certificates(
        self, kind: BuiltinKind, key: Key, uid: str | None, wanted: Mapping[Key, CertificateSpec]
    ) -> None:
        """The Certificates (``(namespace, name)``) an Ingress or Gateway (``uid``; None once
        gone) wants, made for it; those it no longer wants deleted, and never one of that name
        that is not its own. One in the owner's namespace is owned by it (garbage-collected with
        it); one beside a Secret of another namespace (a Gateway's, by a ReferenceGrant) says
        its owner in annotations, and goes when the owner no longer wants it."""
        kube = self.context.kube
        made_for = (kind.kind, *key)
        reference = {"metadata": {"namespace": key[0], "name": key[1], "uid": uid or ""}}
        for (namespace, name), spec in wanted.items():
            body = spec.model_dump(mode="json", by_alias=True)
            if self.certificates.get((namespace, name)) == body:
                continue
            assert uid is not None
            existing = await kube.get_object(CERTIFICATE, namespace, name)
            earlier = existing is not None and not _owned(existing, kind, key, uid)
            if earlier and existing is not None and _owned(existing, kind, key, None):
                # (made for an earlier object of that name: made anew for this one)
                await kube.delete_object(CERTIFICATE, namespace, name)
                existing = None
            if existing is not None and not _owned(existing, kind, key, uid):
                # (someone else's of that name, a Tunnel's say: never touched)
                if self.certificates.get((namespace, name)) != {"taken": True}:
                    self.certificates[(namespace, name)] = {"taken": True}
                    message = (f"{spec.domain}: Certificate {name} of namespace {namespace} is "
                               f"not this {kind.kind}'s; rename or delete it.")  # fmt: skip
                    await kube.announce(kind, reference, True, "CertificateNameTaken", message)
                continue
            if existing is not None and existing["spec"].get("domain") != body["domain"]:
                await kube.delete_object(CERTIFICATE, namespace, name)  # (domain is immutable)
                existing = None
            if existing is None:
                made = _certificate(kind, key, uid, namespace, name, body)
                await kube.create_object(CERTIFICATE, namespace, made)
            elif {k: existing["spec"].get(k) for k in body} != body:
                await kube.patch_object(CERTIFICATE, namespace, name, {"spec": body})
            self.certificates[(namespace, name)] = body
            self.made.setdefault(made_for, set()).add((namespace, name))
        for namespace, name in sorted(self.made.get(made_for, set()) - set(wanted)):
            existing = await kube.get_object(CERTIFICATE, namespace, name)
            # (by the owner's name: one made for an earlier object of that name goes too)
            if existing is not None and _owned(existing, kind, key, None):
                await kube.delete_object(CERTIFICATE, namespace, name)
            self.certificates.pop((namespace, name), None)
            self.made[made_for].discard((namespace, name))
        if not self.made.get(made_for):
            self.made.pop(made_for, None)

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

    async def _tell(
        self, kind: BuiltinKind, key: Key, decided: IngressDecision | HTTPRouteDecision,
        problems: tuple[str, ...], claims: Sequence[TunnelFacts], snapshot: Snapshot,
    ) -> None:  # fmt: skip
        """Events: each field that cannot be served, once; each host's verdict when it moves."""
        kube = self.context.kube
        body = _reference(decided)
        told = self.told_problems.get((kind.kind, *key), ())
        if problems != told:
            new = [problem for problem in problems if problem not in told]
            for problem in new[:MAX_PROBLEM_EVENTS]:
                await kube.announce(kind, body, True, "RouteRefused", problem)
            if len(new) > MAX_PROBLEM_EVENTS:
                await kube.announce(kind, body, True, "RouteRefused",
                                    f"and {len(new) - MAX_PROBLEM_EVENTS} more fields are not "
                                    "served.")  # fmt: skip
            self.told_problems[(kind.kind, *key)] = problems
        for claim in claims:
            verdict = snapshot.route_verdicts.get(claim.id)
            if verdict is None or self.told_hosts.get(claim.id) == (verdict.status, verdict.reason):
                continue
            if verdict.reason == "CertificatePending" and claim.id not in self.told_hosts:
                continue  # (its Certificate's first look is a moment away)
            serving = verdict.status == "True"
            said = f"port {claim.port}/{claim.protocol}" if claim.by_port else claim.domain
            message = f"{said}: {verdict.message}"
            await kube.announce(kind, body, not serving, verdict.reason, message)
            self.told_hosts[claim.id] = (verdict.status, verdict.reason)


OWNER_ANNOTATION = "kakuremichi.io/owner"
"""On a Certificate outside its owner's namespace: ``<apiVersion> <Kind> <namespace>/<name>
<uid>`` (an owner reference cannot cross namespaces)."""


def _certificate(
    kind: BuiltinKind, owner: Key, uid: str, namespace: str, name: str, spec: dict[str, Any]
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(MANAGED_BY)}
    if namespace == owner[0]:
        metadata["ownerReferences"] = [{
            "apiVersion": kind.api_version, "kind": kind.kind, "name": owner[1], "uid": uid,
            "controller": True, "blockOwnerDeletion": True,
        }]  # fmt: skip
    else:
        metadata["annotations"] = {OWNER_ANNOTATION: _owner_said(kind, owner, uid)}
    return {"apiVersion": API_VERSION, "kind": CERTIFICATE.kind, "metadata": metadata,
            "spec": spec}  # fmt: skip


def _owner_said(kind: BuiltinKind, owner: Key, uid: str) -> str:
    return f"{kind.api_version} {kind.kind} {owner[0]}/{owner[1]} {uid}"


def _made_for(meta: Mapping[str, Any]) -> list[Owner]:
    """The Ingress or Gateway a Certificate was made for, if any."""
    found: list[Owner] = []
    namespace = str(meta.get("namespace") or "")
    for kind in (INGRESS, ROUTED_GATEWAY):
        for owner in meta.get("ownerReferences") or ():
            if (owner.get("kind"), owner.get("apiVersion")) == (kind.kind, kind.api_version):
                found.append((kind.kind, namespace, str(owner.get("name") or "")))
        said = str((meta.get("annotations") or {}).get(OWNER_ANNOTATION) or "").split(" ")
        labels = meta.get("labels") or {}
        ours = all(labels.get(k) == v for k, v in MANAGED_BY.items())
        if ours and len(said) == 4 and (said[0], said[1]) == (kind.api_version, kind.kind):
            owner_namespace, _, owner_name = said[2].partition("/")
            if owner_namespace != namespace:  # (only ever written across namespaces)
                found.append((kind.kind, owner_namespace, owner_name))
    return found


def _terminating(error: Exception) -> bool:
    """Refused because the namespace is being deleted (nothing to write there any more)."""
    return isinstance(error, ApiException) and "NamespaceTerminating" in str(error.body or "")


def _key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _route_edit(
    decided: HTTPRouteDecision | None, now: datetime
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(stored: dict[str, Any]) -> dict[str, Any]:
        return {**stored, **gateway_api_status.route_status(decided, stored, now)}

    return edit


def _pool_addresses(snapshot: Snapshot, gateway: GatewayDecision) -> list[str]:
    """The public addresses of the pool a Gateway is bound to (None: of every pool)."""
    return sorted({
        node.public_ip for node in snapshot.facts.gateways.values()
        if gateway.pool is None or (node.pool or node.name) == gateway.pool
    })  # fmt: skip


def _reference(decided: IngressDecision | HTTPRouteDecision) -> dict[str, Any]:
    return {"metadata": {"namespace": decided.namespace, "name": decided.name, "uid": decided.uid}}


def _owned(certificate: Mapping[str, Any], kind: BuiltinKind, owner: Key, uid: str | None) -> bool:
    """Made for that object (of that uid; once it is gone, of that name): by its owner
    reference, or, outside its namespace, by the owner annotation."""
    meta = certificate.get("metadata") or {}
    said = str((meta.get("annotations") or {}).get(OWNER_ANNOTATION) or "")
    if said:
        mine = _owner_said(kind, owner, uid or "")
        return said == mine if uid else said.rsplit(" ", 1)[0] == mine.rsplit(" ", 1)[0]
    if meta.get("namespace") not in (None, owner[0]):
        return False
    return any(
        o.get("kind") == kind.kind and o.get("apiVersion") == kind.api_version
        and (o.get("uid") == uid if uid else o.get("name") == owner[1])
        for o in meta.get("ownerReferences") or ()
    )  # fmt: skip


def _dates(stored: Mapping[str, str]) -> dict[UUID, datetime]:
    found = {}
    for claim, when in stored.items():
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(when)
            found[UUID(claim)] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return found


def _watch_gateway_api(
    registry: kopf.OperatorRegistry, controller: IngressController, kind: BuiltinKind
) -> None:
    """(kopf watches these once their CRDs exist, and not before.)"""

    @kopf.on.event(kind.group, kind.version, kind.plural, registry=registry)
    async def gateway_api_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            namespace, name = body.metadata.namespace or "", body.metadata.name or ""
            controller.gateway_api_gone(kind, namespace, name)
        else:
            controller.saw_gateway_api(kind, body)


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

    @kopf.on.event(NAMESPACE.group, NAMESPACE.version, NAMESPACE.plural, registry=registry)
    async def namespace_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        name = body.metadata.name or ""
        gone = type == "DELETED"
        controller.heard(sources.namespace_gone(name) if gone else sources.saw_namespace(body))

    for kind in (GATEWAY_CLASS, ROUTED_GATEWAY, *ROUTE_KINDS.values(), REFERENCE_GRANT):
        _watch_gateway_api(registry, controller, kind)

    @kopf.on.event(GROUP, VERSION, CERTIFICATE.plural, registry=registry)
    async def certificate_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            controller.certificate_gone(body.metadata.namespace or "", body.metadata.name or "")

    return controller
