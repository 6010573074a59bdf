"""Certificate reconciler: the certificate in the ``kubernetes.io/tls`` Secret is what is served.

With ``issuer: Secret`` the user keeps that Secret; with ``issuer: ACME`` the
:mod:`~kakuremichi.control.acme_issuer` writes it, and only into a Secret it made for that
Certificate (any other of that name is ``SecretNotOwned``, left alone and not served). Either
way the Secret is parsed and checked (covers the domain, valid now, key matches); a good one is
mirrored (private key sealed) and, when the Certificate's Tunnel holds the domain, served; a bad
or missing one makes ``Ready=False`` say why while the gateways keep serving the last good
certificate.

Secrets are read by name, never listed: the operator watches only Secrets labelled
``kakuremichi.io/certificate`` (its own, and users' that carry the label) and looks again at the
others a Certificate reads again on a timer (:func:`recheck_sources`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import kopf

from kakuremichi.api.conditions import is_ready, set_ready
from kakuremichi.api.fields import status_patch
from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.api.resources import CERTIFICATE, CertificateSpec, CertificateStatus
from kakuremichi.control.context import Context
from kakuremichi.control.kube_api import SecretNotOwned
from kakuremichi.control.manifests import CERTIFICATE_LABEL
from kakuremichi.control.mirror import CertificateRow
from kakuremichi.control.reconciler import register_reconciler
from kakuremichi.control.tls_material import CertificateProblem, inspect
from kakuremichi.control.tunnel_readiness import CertificateVerdict

RECHECK_SECONDS = 300.0
SOURCE_RECHECK_SECONDS = 60.0
"""The longest the operator goes without reading again a Secret that a Certificate reads and
that it does not watch (no ``kakuremichi.io/certificate`` label)."""
SOURCE_RECHECK_MIN_SECONDS = 1.0
ACME_SETTLE_SECONDS = 0.05
ACME_RETRY_SECONDS = 5.0
log = logging.getLogger(__name__)


async def evaluate(
    context: Context, namespace: str, name: str, uid: str, spec: CertificateSpec
) -> tuple[CertificateVerdict, CertificateBundle | None, Any]:
    """The verdict on a Certificate, the bundle to serve (when good) and its details."""
    # Cached for a moment (and forgotten on the Secret's watch events): Certificates that share
    # one Secret, as thousands may, read it once.
    stored = await context.kube.stored_secret(namespace, spec.secret_name, cached=True)
    context.state.saw_secret(
        (namespace, spec.secret_name),
        stored.resource_version if stored else "",
        stored is not None and CERTIFICATE_LABEL in stored.labels,
    )
    if spec.issuer == "ACME" and stored is not None and not stored.owned_by(uid):
        # Not the operator's for this Certificate: never written over, and not served either.
        message = str(SecretNotOwned(namespace, spec.secret_name))
        return CertificateVerdict(False, "SecretNotOwned", message), None, None
    data = None if stored is None else stored.data
    problem: CertificateVerdict | None = None
    if data is None:
        problem = CertificateVerdict(
            False, "SecretNotFound", f"Secret {namespace}/{spec.secret_name} does not exist"
        )
    else:
        chain, key = data.get("tls.crt", ""), data.get("tls.key", "")
        try:
            info = inspect(chain.encode(), key.encode(), spec.domain, datetime.now(UTC))
        except CertificateProblem as error:
            problem = CertificateVerdict(False, error.reason, str(error))
    if problem is not None:
        if spec.issuer == "ACME":
            # Nothing to serve yet: the issuer says where it stands (Issuing, NoGatewayOnline…).
            return acme_progress(context, (namespace, name)), None, None
        return problem, None, None
    bundle = CertificateBundle(domain=spec.domain, certificate=chain, private_key=key)
    verdict = CertificateVerdict(True, "Valid", f"valid until {info.not_after.isoformat()}")
    if spec.issuer == "ACME":
        renewal = acme_progress(context, (namespace, name))
        if renewal.reason not in ("Issuing", "NoGatewayOnline") and not renewal.ready:
            # Still served; say why the renewal has not happened.
            verdict = CertificateVerdict(
                True, "RenewalFailed", f"{verdict.message}; renewal failed: {renewal.message}"
            )
    return verdict, bundle, info


def acme_progress(context: Context, key: tuple[str, str]) -> CertificateVerdict:
    """Where the Certificate's ACME task stands, as it last said."""
    return context.state.acme_progress.get(key) or CertificateVerdict(
        False, "Issuing", "obtaining a certificate from the ACME server"
    )


async def follow_acme(context: Context) -> None:
    """The ACME tasks tell where they stand (``state.acme_progress``); a Certificate whose news
    changed gets its status computed and written again. A write that fails is tried again
    shortly, not only at the next change."""
    state, seen = context.state, -1
    written: dict[tuple[str, str], CertificateVerdict | None] = {}
    while True:
        with contextlib.suppress(TimeoutError):
            seen = await asyncio.wait_for(state.changed(seen), ACME_RETRY_SECONDS)
        await asyncio.sleep(ACME_SETTLE_SECONDS)  # a burst of news, one write
        news = dict(state.acme_progress)
        for key in [k for k in written if k not in news and k not in state.acme_wanted]:
            del written[key]
        for key in sorted(set(written) | set(news)):
            if key in written and written[key] == news.get(key):
                continue
            try:
                await refresh(context, *key)
                written[key] = news.get(key)
            except Exception as error:  # the next pass tries again
                log.warning("writing the status of %s/%s failed: %s", *key, error)


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    patch.status.update(await compute_status(context, body))


async def refresh(context: Context, namespace: str, name: str) -> None:
    """Look at a Certificate again outside its own events (its Secret changed, the ACME task
    has news)."""
    async with context.statuses.lock(CERTIFICATE, namespace, name):
        found = await context.kube.get_object(CERTIFICATE, namespace, name)
        if found is not None:
            status = await compute_status(context, kopf.Body(cast(kopf.RawBody, found)))
            await context.statuses.write(CERTIFICATE, namespace, name, status)


async def compute_status(context: Context, body: kopf.Body) -> dict[str, Any]:
    """Record the Certificate's verdict (and good material) and return its new status."""
    meta = body.metadata
    namespace, name = meta.namespace or "", meta.name or ""
    spec = CertificateSpec.model_validate(dict(body.spec))
    current = CertificateStatus.model_validate(dict(body.status))
    context.state.use_secret(namespace, name, spec.secret_name)
    context.state.want_acme((namespace, name), spec.issuer == "ACME")
    verdict, bundle, info = await evaluate(context, namespace, name, meta.uid or "", spec)
    expires = info.not_after if info is not None else None
    context.state.set_certificate((namespace, name), verdict, bundle, expires)
    updates: dict[str, Any] = {
        "conditions": set_ready(
            current.conditions,
            "True" if verdict.ready else "False",
            verdict.reason,
            verdict.message,
            meta.get("generation"),
        ),
        "observed_generation": meta.get("generation"),
    }
    if info is not None:
        renewed = info.not_before != current.not_before
        updates |= {
            "not_before": info.not_before,
            "not_after": info.not_after,
            "renewal_time": info.renewal_time(),
            "last_renewed_at": info.not_before if renewed else current.last_renewed_at,
        }
        assert bundle is not None
        # The mirror's row: the projector writes the rows of the certificates being served
        # (those of domains their Tunnels hold), so another namespace's never takes its place.
        context.state.set_certificate_row(
            (namespace, name),
            CertificateRow(
                id=UUID(meta.uid),
                domain=spec.domain,
                certificate=bundle.certificate,
                sealed_private_key=context.state.sealer.seal(
                    bundle.private_key, f"certificates.private_key:{spec.domain}"
                ),
                expires_at=info.not_after,
                auto_renew=spec.auto_renew,
                last_renewed_at=info.not_before,
            ),
        )
    was_ready = is_ready(current.conditions)
    if verdict.ready != was_ready or not current.conditions:
        await context.kube.announce(
            CERTIFICATE, body, not verdict.ready, verdict.reason, verdict.message
        )
    # Only what this computes: the ACME task owns orderURL, failedAttempts and nextAttemptAt,
    # and the body here may be older than its last write.
    return status_patch(current, updates)


async def cleanup(context: Context, body: kopf.Body) -> None:
    meta = body.metadata
    context.state.want_acme((meta.namespace or "", meta.name or ""), False)
    context.state.remove_certificate((meta.namespace or "", meta.name or ""))
    context.state.use_secret(meta.namespace or "", meta.name or "", None)


async def recheck_sources(context: Context) -> None:
    """Secrets Certificates read but the operator does not watch: read each again, first a
    second after it was last seen to change, then ever less often up to every
    :data:`SOURCE_RECHECK_SECONDS`, and make its Certificates look again when it changed. A
    Secret created just after its Tunnel is served within seconds; a renewed one within a
    minute."""
    state = context.state
    schedule: dict[tuple[str, str], tuple[float, float]] = {}
    """(namespace, Secret) → (when to read it next, the interval that led there)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SOURCE_RECHECK_MIN_SECONDS)
        now = loop.time()
        for gone in set(schedule) - set(state.secret_users):
            del schedule[gone]
        # Only the Secrets of Certificates whose Tunnel holds the domain: what others hold is
        # served to nobody, and a namespace's thousands of them must not cost a read each.
        held = {h.certificate_key for h in state.snapshot().ownership.holders.values()}
        for key, users in list(state.secret_users.items()):
            if not any((key[0], certificate) in held for certificate in users):
                continue
            due, interval = schedule.setdefault(key, (now + SOURCE_RECHECK_MIN_SECONDS, 0.0))
            seen = state.secret_versions.get(key)
            if due > now or (seen is not None and seen[1]):
                continue  # (a labelled one is watched: its events tell)
            interval = min(SOURCE_RECHECK_SECONDS, max(SOURCE_RECHECK_MIN_SECONDS, interval * 2))
            schedule[key] = (now + interval, interval)
            namespace, secret = key
            try:
                stored = await context.kube.stored_secret(namespace, secret)
                if seen is not None and seen[0] == (stored.resource_version if stored else ""):
                    continue
                schedule[key] = (now + SOURCE_RECHECK_MIN_SECONDS, 0.0)  # changing: look soon
                context.kube.forget_secret(namespace, secret)
                for certificate in sorted(users):
                    await refresh(context, namespace, certificate)
            except Exception:  # the next round tries again
                log.exception("reading Secret %s/%s again failed", namespace, secret)


async def recheck(context: Context) -> None:
    """Expiry happens without any event: look again at the Certificates whose certificate has
    expired since, at once, and at those that are not Ready (not yet valid, say) every
    :data:`RECHECK_SECONDS`. One task for all, instead of a kopf timer per Certificate (a task
    each, and a finalizer each)."""
    state = context.state
    last_full = asyncio.get_running_loop().time()
    while True:
        now = datetime.now(UTC)
        wake = now + timedelta(seconds=RECHECK_SECONDS)
        for key, expiry in list(state.certificate_expiry.items()):
            if expiry < wake and state.certificate_verdicts.get(key, _EXPIRED).ready:
                wake = expiry
        await asyncio.sleep(max(1.0, (wake - now).total_seconds()))
        now = datetime.now(UTC)
        full = asyncio.get_running_loop().time() - last_full >= RECHECK_SECONDS
        if full:
            last_full = asyncio.get_running_loop().time()
        due = [
            key
            for key, verdict in list(state.certificate_verdicts.items())
            if (verdict.ready and state.certificate_expiry.get(key, now) <= now)
            or (full and not verdict.ready)
        ]
        for namespace, name in due:
            try:
                await refresh(context, namespace, name)
            except Exception:  # the next round tries again
                log.exception("rechecking Certificate %s/%s failed", namespace, name)


_EXPIRED = CertificateVerdict(False, "Expired", "")


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    # No finalizer: the cleanup concerns the in-memory state and the ACME task; the mirror's
    # row follows the projector (which writes exactly the rows of the served certificates).
    register_reconciler(registry, context, CERTIFICATE, reconcile, cleanup, finalizer=False)

    def referenced(namespace: str | None, name: str | None, **_: Any) -> bool:
        return bool(context.state.secret_users.get((namespace or "", name or "")))

    # The watch asks the API server for labelled Secrets only (see main.py's label selector):
    # the operator never streams, nor keeps, every Secret of the cluster.
    @kopf.on.event(
        "", "v1", "secrets", registry=registry, labels={CERTIFICATE_LABEL: kopf.PRESENT},
        when=referenced,
    )  # fmt: skip
    async def secret_changed(name: str, namespace: str | None, **_: Any) -> None:
        """A Secret that a Certificate reads changed: make that Certificate look again."""
        context.kube.forget_secret(namespace or "", name)
        users = context.state.secret_users.get((namespace or "", name), set())
        for certificate in sorted(users):
            await refresh(context, namespace or "", certificate)
