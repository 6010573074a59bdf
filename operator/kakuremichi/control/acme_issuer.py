"""ACME issuance and renewal for Certificates with ``issuer: ACME``: one task per Certificate.

Each task loops: while the Secret holds a good certificate that is not due, it sleeps until the
renewal time (2/3 of the lifetime, or the server's ARI window when it offers one). When a
certificate is needed it waits for a gateway to be online, orders (the order URL is written to
status first, so a restart resumes it), pushes the HTTP-01 token to every gateway, checks
through each online gateway's public HTTP port that the token is served, answers, finalizes with
a fresh key (kept in a Secret before finalization) and writes the ``kubernetes.io/tls`` Secret.
The Certificate reconciler then serves it like any other. Failures become ``Ready=False`` with
the ACME problem, an Event, and a retry after a delay that doubles (or the server's
``Retry-After``); the current certificate keeps being served meanwhile.

Blocking ``acme`` calls run in worker threads; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp

from kakuremichi.api.protocol import AcmeChallenge
from kakuremichi.api.resources import CERTIFICATE, CertificateSpec, CertificateStatus
from kakuremichi.control.acme import AcmeProblem, AcmeSession, generate_account_key
from kakuremichi.control.kube_api import MANAGED_BY, SecretNotOwned, StoredSecret
from kakuremichi.control.manifests import CERTIFICATE_LABEL
from kakuremichi.control.tls_material import CertificateInfo, CertificateProblem, inspect
from kakuremichi.control.tunnel_readiness import CertificateVerdict

MAX_RETRY_SECONDS = 3600.0
MAX_SLEEP_SECONDS = 3600.0
SELF_CHECK_SECONDS = 10.0
"""Gateways apply a pushed token within a second or so; longer means they cannot serve it."""
GATEWAY_WAIT_SECONDS = 2.0
FOREIGN_SECRET_RECHECK_SECONDS = 60.0
"""On the Secrets the operator writes for a Certificate (its name): the operator watches
Secrets with this label, and a user's Secret with it is noticed at once too."""
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kakuremichi.control.context import Context

Key = tuple[str, str]


def retry_delay(base: float, failures: int, retry_after: float | None) -> float:
    """Seconds before the next attempt: the server's ``Retry-After`` when it gave one, else
    ``base`` doubled per failure in a row, capped at an hour."""
    if retry_after is not None:
        return max(1.0, retry_after)
    return float(min(MAX_RETRY_SECONDS, base * 2 ** max(0, failures - 1)))


def pending_key_secret(certificate: str) -> str:
    return f"{certificate}-acme-key"


def secret_labels(certificate: str) -> dict[str, str]:
    return {**MANAGED_BY, CERTIFICATE_LABEL: certificate}


class Abandoned(Exception):
    """The Certificate's Tunnel no longer holds the domain: the order is dropped."""


WAIT_FOR_HOLDER = -1.0
"""What :meth:`AcmeIssuer._step` returns when only a change of the domain's holder can help."""


class AcmeIssuer:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.tasks: dict[Key, asyncio.Task[None]] = {}
        self.wake: dict[Key, asyncio.Event] = {}
        self._ari: dict[Key, tuple[str, datetime | None, datetime]] = {}
        """Per Certificate: (chain, ARI's suggested renewal, when to ask again)."""
        self._session: AcmeSession | None = None
        self._session_lock = asyncio.Lock()
        self._awaiting_holder: dict[Key, str] = {}
        """Certificates whose Tunnel does not hold the domain (→ domain): one watcher wakes
        them when that changes, instead of each polling."""
        self._holder_watch: asyncio.Task[None] | None = None

    # --- which Certificates ---------------------------------------------------------------

    async def run(self) -> None:
        """Follow the facts: a task for every Certificate that wants ACME, nudged each time its
        reconcile looks again, stopped when it no longer wants it (or is gone)."""
        state, seen = self.context.state, -1
        looked: dict[Key, int] = {}
        while True:
            seen = await state.changed(seen)
            wanted = dict(state.acme_wanted)
            for key in [k for k in self.tasks if k not in wanted]:
                await self.stop(*key)
            for key in [k for k in looked if k not in wanted]:
                del looked[key]
            for key, count in wanted.items():
                if looked.get(key) != count:
                    looked[key] = count
                    self._ensure(key)

    def _tell(self, key: Key, progress: CertificateVerdict | None) -> None:
        """News for the Certificate's status (its projection decides what it says)."""
        self.context.state.set_acme_progress(key, progress)

    def _ensure(self, key: Key) -> None:
        """Run (or nudge) the task of this Certificate."""
        task = self.tasks.get(key)
        if task is not None and not task.done():
            self.wake[key].set()
            return
        self.wake[key] = asyncio.Event()
        self.tasks[key] = asyncio.create_task(self._run(key), name=f"acme {key[0]}/{key[1]}")
        if self._holder_watch is None or self._holder_watch.done():
            self._holder_watch = asyncio.create_task(self._watch_holders(), name="acme holders")

    async def stop(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.wake.pop(key, None)
        self._tell(key, None)
        self._ari.pop(key, None)
        self._awaiting_holder.pop(key, None)
        self.context.state.set_challenge(key, None)

    async def close(self) -> None:
        for namespace, name in list(self.tasks):
            await self.stop(namespace, name)
        if self._holder_watch is not None:
            self._holder_watch.cancel()
            await asyncio.gather(self._holder_watch, return_exceptions=True)

    def _may_issue(self, key: Key, domain: str) -> bool:
        return self.context.state.snapshot().may_issue(key, domain)

    async def _watch_holders(self) -> None:
        """Wake the Certificates whose Tunnel has come to hold their domain."""
        state, seen = self.context.state, -1
        while True:
            seen = await state.changed(seen)
            if not self._awaiting_holder:
                continue
            try:
                snapshot = state.snapshot()
                for key, domain in list(self._awaiting_holder.items()):
                    if snapshot.may_issue(key, domain) and key in self.wake:
                        del self._awaiting_holder[key]
                        self.wake[key].set()
            except Exception:  # a bug here must not leave every waiting Certificate asleep
                log.exception("waking Certificates whose Tunnel holds the domain failed")

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self, key: Key) -> None:
        namespace, name = key
        while True:
            try:
                delay = await self._step(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ACME for %s/%s failed unexpectedly", namespace, name)
                delay = self.context.settings.acme_retry_base
            if delay is None:
                return
            progress = self.context.state.acme_progress.get(key)
            if delay == WAIT_FOR_HOLDER:
                await self._until_holder(key)
            elif progress is not None and progress.reason == "NoGatewayOnline":
                await self._until_gateway(key)
            else:
                await self._sleep(key, delay)

    async def _until_gateway(self, key: Key) -> None:
        """Wait without API calls until a gateway is online (or the Certificate changes)."""
        event = self.wake[key]
        event.clear()
        while not self._online_gateways() and not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), GATEWAY_WAIT_SECONDS)

    async def _until_holder(self, key: Key) -> None:
        """Wait until :meth:`_watch_holders` sees this Certificate's Tunnel hold the domain
        (or the Certificate changes)."""
        event = self.wake[key]
        event.clear()
        if key not in self._awaiting_holder:  # woken already (it leaves the set when woken)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), MAX_SLEEP_SECONDS)

    async def _sleep(self, key: Key, seconds: float) -> None:
        event = self.wake[key]
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, min(seconds, MAX_SLEEP_SECONDS)))

    async def _step(self, key: Key) -> float | None:
        """One look at the Certificate; returns how long to sleep (None: it is gone)."""
        namespace, name = key
        kube = self.context.kube
        body = await kube.get_object(CERTIFICATE, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return None
        spec = CertificateSpec.model_validate(body.get("spec") or {})
        if spec.issuer != "ACME":
            return None
        status = CertificateStatus.model_validate(body.get("status") or {})
        uid = str(body["metadata"]["uid"])
        now = datetime.now(UTC)
        stored = await kube.stored_secret(namespace, spec.secret_name)
        if stored is not None and not stored.owned_by(uid):
            # Someone else's Secret: never written over, and what it holds is not ours.
            foreign = str(SecretNotOwned(namespace, spec.secret_name))
            self._tell(key, CertificateVerdict(False, "SecretNotOwned", foreign))
            return FOREIGN_SECRET_RECHECK_SECONDS
        current = self._current(stored, spec, now)
        if current is not None:
            chain, info = current
            if not spec.auto_renew:
                self._tell(key, None)
                return MAX_SLEEP_SECONDS
            due = await self._renewal_due(key, chain, info)
            if now < due:
                self._tell(key, None)
                return (due - now).total_seconds()
        if not self._may_issue(key, spec.domain):
            return await self._not_holder(key, spec.domain, status)
        if status.next_attempt_at is not None and now < status.next_attempt_at:
            return (status.next_attempt_at - now).total_seconds()
        if not self._online_gateways():
            self._tell(key, CertificateVerdict(
                False, "NoGatewayOnline",
                "waiting for a gateway to come online to answer the HTTP-01 challenge",
            ))  # fmt: skip
            return GATEWAY_WAIT_SECONDS
        try:
            await self._issue(key, body, spec, status)
        except Abandoned:  # (an order it made in this step is in status now: drop it too)
            return await self._not_holder(key, spec.domain, status, in_flight=True)
        except SecretNotOwned as error:
            self._tell(key, CertificateVerdict(False, "SecretNotOwned", str(error)))
            return FOREIGN_SECRET_RECHECK_SECONDS
        except AcmeProblem as problem:
            failures = (status.failed_attempts or 0) + 1
            delay = retry_delay(
                self.context.settings.acme_retry_base, failures, problem.retry_after
            )
            message = f"{problem.detail} (attempt {failures}; next in {delay:.0f}s)"
            self._tell(key, CertificateVerdict(False, problem.reason, message))
            log.warning("ACME for %s/%s: %s", namespace, name, message)
            await self.context.statuses.write(CERTIFICATE, namespace, name, {
                "failedAttempts": failures,
                # (From now, not from the attempt's start: it may have taken a while.)
                "nextAttemptAt": (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(),
            })  # fmt: skip
            await self._event(body, True, problem.reason, message)
            return delay
        finally:
            self.context.state.set_challenge(key, None)
        self._tell(key, None)
        await self._event(body, False, "Issued", f"certificate for {spec.domain} issued")
        return 0.0  # look again at once: the new certificate's renewal time

    async def _not_holder(
        self, key: Key, domain: str, status: CertificateStatus, in_flight: bool = False
    ) -> float:
        """No order for a domain this Certificate's Tunnel does not hold; one in flight is
        dropped. Wait until the holder changes."""
        self._tell(key, CertificateVerdict(
            False, "DomainNotHeld",
            f"no Tunnel of this namespace that uses this Certificate holds {domain}: no "
            "certificate is ordered for it",
        ))  # fmt: skip
        if status.order_url or in_flight:
            namespace, name = key
            await self.context.statuses.write(CERTIFICATE, namespace, name, {"orderURL": None})
            log.info("ACME: dropped the order of %s/%s (%s changed hands)", namespace, name, domain)
        self._awaiting_holder[key] = domain
        if self._may_issue(key, domain):  # (it changed meanwhile: the watcher saw it first)
            self._awaiting_holder.pop(key, None)
            return 0.0
        return WAIT_FOR_HOLDER

    def _current(
        self, stored: StoredSecret | None, spec: CertificateSpec, now: datetime
    ) -> tuple[str, CertificateInfo] | None:
        if stored is None or not stored.data:
            return None
        chain, key = stored.data.get("tls.crt", ""), stored.data.get("tls.key", "")
        try:
            return chain, inspect(chain.encode(), key.encode(), spec.domain, now)
        except CertificateProblem:
            return None

    async def _renewal_due(self, key: Key, chain: str, info: CertificateInfo) -> datetime:
        """ARI's suggestion when the server offers one (asked again only when it says so),
        else 2/3 of the lifetime."""
        cached = self._ari.get(key)
        now = datetime.now(UTC)
        if cached is None or cached[0] != chain or now >= cached[2]:
            try:
                session = await self.session()
                suggested, recheck = await asyncio.to_thread(session.renewal_window_start, chain)
            except AcmeProblem:
                suggested, recheck = None, None
            cached = (chain, suggested, _aware(recheck) or now + timedelta(hours=6))
            self._ari[key] = cached
        suggested = _aware(cached[1])
        return suggested if suggested is not None else info.renewal_time()

    def _online_gateways(self) -> list[tuple[str, int]]:
        """(public IP, HTTP port) of each connected gateway instance."""
        state = self.context.state
        found = []
        for edge_id, identity in self.context.presence.online.items():
            gateway = state.gateways.get(edge_id)
            if identity.role == "gateway" and gateway is not None:
                found.append((gateway.public_ip, gateway.http_port))
        return sorted(found)

    # --- one issuance ------------------------------------------------------------------------

    async def _issue(
        self, key: Key, body: dict[str, Any], spec: CertificateSpec, status: CertificateStatus
    ) -> None:
        namespace, name = key
        kube, settings = self.context.kube, self.context.settings
        uid = str(body["metadata"]["uid"])

        def still_holder() -> None:
            # Asked before every step that commits to the domain: an order for a domain that
            # changed hands (holder deleted and re-created elsewhere, policy changed) is dropped.
            if not self._may_issue(key, spec.domain):
                raise Abandoned

        session = await self.session()
        self._tell(
            key, CertificateVerdict(False, "Issuing", f"ordering a certificate for {spec.domain}")
        )
        order = None
        if status.order_url:
            order = await asyncio.to_thread(session.order, status.order_url)
            if order is not None and order.domains != (spec.domain,):
                order = None  # an order for other names is never resumed for this one
        pending = await kube.stored_secret(namespace, pending_key_secret(name))
        key_pem = pending.data.get("tls.key") if pending and pending.owned_by(uid) else None
        if order is None or order.status == "invalid" or key_pem is None:
            still_holder()
            order = await asyncio.to_thread(session.new_order, spec.domain, settings.acme_profile)
            # Written before any next step: a restart picks the order up again.
            await self.context.statuses.write(CERTIFICATE, namespace, name, {"orderURL": order.url})
            key_pem = generate_account_key()
            await kube.delete_secret(namespace, pending_key_secret(name), owner_uid=uid)
            if not await kube.create_secret(
                namespace, pending_key_secret(name), {"tls.key": key_pem}, owner=body,
                labels=secret_labels(name),
            ):  # fmt: skip
                raise SecretNotOwned(namespace, pending_key_secret(name))
        for token, challenge in order.challenges:
            still_holder()
            authorization = session.key_authorization(challenge)
            self.context.state.set_challenge(
                key, AcmeChallenge(domain=spec.domain, token=token, key_authorization=authorization)
            )
            await self._self_check(spec.domain, token, authorization)
            still_holder()
            await asyncio.to_thread(session.answer, challenge)
        still_holder()
        chain = await asyncio.to_thread(session.finalize, order.url, key_pem, spec.domain)
        still_holder()
        try:  # what the CA returned must be for this domain and this key, whatever the order
            inspect(chain.encode(), key_pem.encode(), spec.domain, datetime.now(UTC))
        except CertificateProblem as problem:
            raise AcmeProblem("badCertificate", f"the issued certificate: {problem}") from None
        # The attempts are over before the certificate lands: once its Secret says Ready, no
        # failure or order of the way there is left in status.
        await self.context.statuses.write(
            CERTIFICATE, namespace, name,
            {"orderURL": None, "failedAttempts": None, "nextAttemptAt": None},
        )  # fmt: skip
        await kube.put_tls_secret(
            namespace, spec.secret_name, chain, key_pem, owner=body, labels=secret_labels(name)
        )
        await kube.delete_secret(namespace, pending_key_secret(name), owner_uid=uid)
        log.info("ACME: issued a certificate for %s (%s/%s)", spec.domain, namespace, name)

    async def _self_check(self, domain: str, token: str, expected: str) -> None:
        """Every online gateway must serve the token on its public HTTP port before the ACME
        server is asked to look: a failure here costs no failed validation at the CA."""
        path = f"/.well-known/acme-challenge/{token}"
        deadline = asyncio.get_running_loop().time() + SELF_CHECK_SECONDS
        problems: dict[str, str] = {}
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                problems = {}
                for address, port in self._online_gateways():
                    where = f"{address}:{port}"
                    try:
                        async with http.get(
                            f"http://{where}{path}", headers={"Host": domain}, allow_redirects=False
                        ) as response:
                            text = await response.text()
                            if response.status != 200 or text.strip() != expected:
                                problems[where] = f"answered {response.status}"
                    except (aiohttp.ClientError, TimeoutError, OSError) as error:
                        problems[where] = f"{type(error).__name__}: {error}".rstrip(": ")
                if not problems and self._online_gateways():
                    return
                if asyncio.get_running_loop().time() > deadline:
                    listed = "; ".join(f"{k} {v}" for k, v in sorted(problems.items()))
                    raise AcmeProblem(
                        "challengeNotServed",
                        f"gateways do not serve the HTTP-01 token for {domain} on their public "
                        f"HTTP port ({listed or 'no gateway online'})",
                    )
                await asyncio.sleep(0.5)

    # --- the account -------------------------------------------------------------------------

    async def session(self) -> AcmeSession:
        """The account's session: its key and URI live in a Secret, made on first use."""
        async with self._session_lock:
            if self._session is not None:
                return self._session
            settings, kube = self.context.settings, self.context.kube
            namespace, secret = settings.system_namespace, settings.acme_account_secret
            stored = await kube.read_secret(namespace, secret) or {}
            key_pem = stored.get("accountKey") or generate_account_key()
            same_server = stored.get("directory") == settings.acme_directory
            uri = stored.get("accountURI") if same_server else None
            ca_file = str(settings.acme_ca_file) if settings.acme_ca_file else None
            session = await asyncio.to_thread(
                AcmeSession, settings.acme_directory, key_pem, ca_file, uri
            )
            if uri is None:
                uri = await asyncio.to_thread(
                    session.register,
                    settings.acme_email,
                    settings.acme_eab_kid,
                    settings.acme_eab_hmac_key,
                )
                data = {"accountKey": key_pem, "accountURI": uri,
                        "directory": settings.acme_directory}  # fmt: skip
                await kube.write_secret(namespace, secret, data, labels=MANAGED_BY)
                log.info("ACME account %s at %s", uri, settings.acme_directory)
            self._session = session
            return session

    async def _event(self, body: dict[str, Any], warning: bool, reason: str, message: str) -> None:
        meta = body.get("metadata", {})
        with contextlib.suppress(Exception):
            await self.context.kube.post_event(
                CERTIFICATE, meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""),
                warning, reason, message,
            )  # fmt: skip


def _aware(moment: datetime | None) -> datetime | None:
    """The acme library mixes aware times with naive local ones (its "now")."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.astimezone(UTC)
