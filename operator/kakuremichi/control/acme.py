"""ACME (RFC 8555) with certbot's ``acme`` library: the blocking calls, for worker threads.

:class:`AcmeSession` holds one account's client. Every call here blocks and is meant for
``asyncio.to_thread``; the orchestration (which step, when, what to persist) lives in
:mod:`kakuremichi.control.acme_issuer`. Problems the server reports become :class:`AcmeProblem`
with the problem document's type and detail and, for rate limits, the ``Retry-After`` delay.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import requests
from acme import challenges, client, errors, messages
from acme import crypto_util as acme_crypto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from kakuremichi import __version__

USER_AGENT = f"kakuremichi/{__version__}"
PROBLEM_PREFIX = "urn:ietf:params:acme:error:"
BAD_NONCE_RETRIES = 5


class AcmeProblem(Exception):
    """The ACME server refused something (or could not be reached)."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        """The problem type without its URN prefix, e.g. ``rateLimited``, ``unauthorized``."""
        self.detail = detail
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        """A condition reason (CamelCase, no spaces): ``AcmeRateLimited`` etc."""
        word = "".join(c for c in self.kind if c.isalnum())
        return "Acme" + (word[:1].upper() + word[1:] if word else "Error")


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date)."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Network(client.ClientNetwork):
    """Keeps ``Retry-After`` of problem responses (the library drops headers), and retries
    rejected nonces a few times (the library retries once; servers may reject any nonce)."""

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(BAD_NONCE_RETRIES):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == BAD_NONCE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _check_response(
        cls, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        try:
            return super()._check_response(response, content_type)
        except messages.Error as error:
            if error.code == "badNonce":
                raise  # the library retries those itself
            raise AcmeProblem(
                error.code or "serverInternal",
                error.detail or str(error),
                retry_after_seconds(response.headers.get("Retry-After")),
            ) from None


def _problem(error: Exception) -> AcmeProblem:
    if isinstance(error, AcmeProblem):
        return error
    if isinstance(error, messages.Error):
        return AcmeProblem(error.code or "serverInternal", error.detail or str(error))
    if isinstance(error, errors.ValidationError):
        details = []
        for authzr in error.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    details.append(f"{challb.error.code}: {challb.error.detail}")
        return AcmeProblem("challengeFailed", "; ".join(details) or "validation failed")
    if isinstance(error, errors.TimeoutError):
        return AcmeProblem("timeout", "the ACME server did not finish in time")
    if isinstance(error, requests.RequestException):
        return AcmeProblem("connection", f"cannot reach the ACME server: {error}")
    return AcmeProblem("error", f"{type(error).__name__}: {error}")


def generate_account_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def generate_certificate_key() -> str:
    return generate_account_key()  # P-256, PKCS#8: accepted everywhere


@dataclass(frozen=True)
class Account:
    key_pem: str
    uri: str


@dataclass(frozen=True)
class Order:
    url: str
    status: str
    """pending, ready, processing, valid or invalid"""
    challenges: list[tuple[str, Any]]
    """(token, challenge body) of each pending HTTP-01 challenge."""
    certificate_url: str | None
    domains: tuple[str, ...] = ()
    """The DNS names the order is for."""


class AcmeSession:
    """One account at one directory. Blocking: call from a worker thread."""

    def __init__(
        self,
        directory_url: str,
        account_key_pem: str,
        ca_file: str | None = None,
        account_uri: str | None = None,
    ) -> None:
        key = serialization.load_pem_private_key(account_key_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = JWKEC(key=key)
        self.net = _Network(self.key, alg=ES256, user_agent=USER_AGENT, timeout=30)
        if ca_file:
            self.net.verify_ssl = cast(bool, ca_file)  # passed to requests as ``verify``
        if account_uri:
            self.net.account = messages.RegistrationResource(
                uri=account_uri, body=messages.Registration()
            )
        try:
            directory = client.ClientV2.get_directory(directory_url, self.net)
        except Exception as error:
            raise _problem(error) from None
        self.directory = directory
        self.acme = client.ClientV2(directory, self.net)

    def register(
        self, email: str | None, eab_kid: str | None = None, eab_hmac_key: str | None = None
    ) -> str:
        """Create (or find) the account for this key; return its URI."""
        eab = None
        if eab_kid and eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.key.public_key(),
                kid=eab_kid,
                hmac_key=eab_hmac_key,
                directory=self.directory,
            )
        elif self.acme.external_account_required():
            raise AcmeProblem(
                "externalAccountRequired",
                "this ACME server needs External Account Binding: set --acme-eab-kid and "
                "--acme-eab-hmac-key",
            )
        registration = messages.NewRegistration.from_data(
            email=email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            regr = self.acme.new_account(registration)
        except errors.ConflictError as existing:
            # The key already has an account: use it.
            self.net.account = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )
            return str(existing.location)
        except Exception as error:
            raise _problem(error) from None
        return str(regr.uri)

    def new_order(self, domain: str, profile: str | None) -> Order:
        # The CSR here only names the identifiers; the one that counts is sent at finalization.
        csr = acme_crypto.make_csr(generate_certificate_key().encode(), [domain])
        try:
            orderr = (
                self.acme.new_order(csr, profile=profile) if profile else (self.acme.new_order(csr))
            )
        except Exception as error:
            raise _problem(error) from None
        return self._order(orderr.uri, orderr.body, orderr.authorizations)

    def order(self, url: str) -> Order | None:
        """The order at ``url`` now; None when the server no longer knows it."""
        try:
            body, authorizations = self._fetch_order(url)
        except AcmeProblem as problem:
            if problem.kind in ("malformed", "notFound") or "404" in problem.detail:
                return None
            raise
        except Exception as error:
            raise _problem(error) from None
        return self._order(url, body, authorizations)

    def _fetch_order(self, url: str) -> tuple[messages.Order, list[messages.AuthorizationResource]]:
        """The order at ``url`` and its authorizations, as the server has them now."""
        body = messages.Order.from_json(self.acme._post_as_get(url).json())
        authorizations = [
            self.acme._authzr_from_response(self.acme._post_as_get(u), uri=u)
            for u in body.authorizations
        ]
        return body, authorizations

    def _order(
        self, url: str, body: messages.Order, authorizations: list[messages.AuthorizationResource]
    ) -> Order:
        pending = []
        for authzr in authorizations:
            if authzr.body.status != messages.STATUS_PENDING:
                continue
            for challb in authzr.body.challenges:
                if isinstance(challb.chall, challenges.HTTP01):
                    pending.append((challb.chall.encode("token"), challb))
        status = body.status.name if body.status else "pending"
        domains = tuple(sorted(i.value for i in body.identifiers or () if i.typ.name == "dns"))
        return Order(url, status, pending, body.certificate, domains)

    def key_authorization(self, challenge: Any) -> str:
        _, validation = challenge.response_and_validation(self.key)
        return str(validation)

    def answer(self, challenge: Any) -> None:
        try:
            response, _ = challenge.response_and_validation(self.key)
            self.acme.answer_challenge(challenge, response)
        except Exception as error:
            raise _problem(error) from None

    def finalize(self, url: str, key_pem: str, domain: str, timeout: float = 90.0) -> str:
        """Wait for the order's authorizations, finalize it with a CSR of ``key_pem`` (unless
        that already happened) and return the full chain, PEM."""
        try:
            body, authorizations = self._fetch_order(url)
            orderr = messages.OrderResource(
                body=body,
                uri=url,
                authorizations=authorizations,
                csr_pem=acme_crypto.make_csr(key_pem.encode(), [domain]),
            )
            # (The library compares with naive local time.)
            deadline = datetime.now() + timedelta(seconds=timeout)
            if body.status == messages.STATUS_PENDING:
                orderr = self.acme.poll_authorizations(orderr, deadline)
            if body.status == messages.STATUS_VALID and body.certificate:
                return str(self.acme._post_as_get(body.certificate).text)
            orderr = self.acme.finalize_order(orderr, deadline)
        except Exception as error:
            raise _problem(error) from None
        return str(orderr.fullchain_pem)

    def renewal_window_start(self, chain_pem: str) -> tuple[datetime | None, datetime | None]:
        """The server's suggested renewal time (ARI) and when to ask again; (None, None) when
        it cannot say. (The library answers None itself when the directory offers no ARI; a
        ``"renewalInfo" in directory`` test would raise: ``Directory`` has no ``__contains__``.)"""
        try:
            suggested, recheck = self.acme.renewal_time(chain_pem.encode())
        except Exception:
            return None, None
        return suggested, recheck
