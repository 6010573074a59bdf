"""How ACME failures turn into conditions and delays: problem types become reasons, a rate
limit's ``Retry-After`` is honoured (shown against a small fake directory on loopback), other
failures back off exponentially up to an hour."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kakuremichi.control.acme import (
    AcmeProblem,
    AcmeSession,
    generate_account_key,
    retry_after_seconds,
)
from kakuremichi.control.acme_issuer import MAX_RETRY_SECONDS, retry_delay


def test_problem_types_become_condition_reasons() -> None:
    assert AcmeProblem("rateLimited", "x").reason == "AcmeRateLimited"
    assert AcmeProblem("challengeNotServed", "x").reason == "AcmeChallengeNotServed"
    assert AcmeProblem("", "x").reason == "AcmeError"


def test_retry_after_accepts_seconds_and_dates() -> None:
    assert retry_after_seconds("120") == 120.0
    now = time.time()
    assert retry_after_seconds(formatdate(now + 60, usegmt=True), now=now) == pytest.approx(60, 1)
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_delays_double_up_to_an_hour_unless_the_server_says_when() -> None:
    assert [retry_delay(30, n, None) for n in (1, 2, 3)] == [30, 60, 120]
    assert retry_delay(30, 50, None) == MAX_RETRY_SECONDS
    assert retry_delay(30, 5, 7.0) == 7.0
    assert retry_delay(30, 1, 0.0) == 1.0  # never a busy loop


def fake_directory(retry_after: str) -> web.Application:
    """Just enough RFC 8555 to reach newAccount, which answers 429 rateLimited."""
    nonce = {"Replay-Nonce": "bm9uY2U", "Cache-Control": "no-store"}

    async def directory(request: web.Request) -> web.Response:
        base = f"http://{request.host}"
        return web.json_response(
            {"newNonce": f"{base}/nonce", "newAccount": f"{base}/account",
             "newOrder": f"{base}/order", "revokeCert": f"{base}/revoke",
             "keyChange": f"{base}/key"}
        )  # fmt: skip

    async def new_nonce(request: web.Request) -> web.Response:
        return web.Response(status=200, headers=nonce)

    async def new_account(request: web.Request) -> web.Response:
        return web.json_response(
            {"type": "urn:ietf:params:acme:error:rateLimited",
             "detail": "too many new registrations from this address"},
            status=429, content_type="application/problem+json",
            headers={**nonce, "Retry-After": retry_after},
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/dir", directory)
    app.router.add_get("/nonce", new_nonce)
    app.router.add_post("/account", new_account)
    return app


def test_a_rate_limit_answer_carries_retry_after_to_the_next_attempt() -> None:
    async def scenario() -> AcmeProblem:
        server = TestServer(fake_directory("7"), host="127.0.0.1")
        await server.start_server()
        try:
            url = f"http://127.0.0.1:{server.port}/dir"

            def register() -> None:
                AcmeSession(url, generate_account_key()).register("admin@example.com")

            with pytest.raises(AcmeProblem) as raised:
                await asyncio.to_thread(register)
            return raised.value
        finally:
            await server.close()

    problem = asyncio.run(scenario())
    assert problem.kind == "rateLimited" and problem.reason == "AcmeRateLimited"
    assert "too many new registrations" in problem.detail
    assert problem.retry_after == 7.0
    assert retry_delay(30, 3, problem.retry_after) == 7.0  # what the issuer waits


def test_an_unreachable_directory_is_a_clear_problem() -> None:
    with pytest.raises(AcmeProblem, match="cannot reach the ACME server"):
        AcmeSession("http://127.0.0.1:9/dir", generate_account_key())
