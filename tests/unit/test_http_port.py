"""The gateway's plain-HTTP port: ACME HTTP-01 tokens answered for their own domain only,
everything else for a served name redirected to HTTPS with 308, other names refused."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from kakuremichi.api.protocol import AcmeChallenge
from kakuremichi.edge.http_port import PlainHttp


def test_challenges_redirects_and_unknown_names() -> None:
    async def scenario() -> None:
        port = {"https": 443}
        plain = PlainHttp(lambda name: name == "app.example.com", lambda: port["https"])
        plain.set_challenges(
            [AcmeChallenge(domain="app.example.com", token="tok-1", key_authorization="tok-1.abc")]
        )
        async with TestClient(TestServer(plain.app())) as http:
            answer = await http.get(
                "/.well-known/acme-challenge/tok-1", headers={"Host": "app.example.com"}
            )
            assert answer.status == 200 and await answer.text() == "tok-1.abc"
            assert (await http.get("/.well-known/acme-challenge/other")).status == 404
            moved = await http.get(
                "/a/b?c=d", headers={"Host": "app.example.com"}, allow_redirects=False
            )
            assert moved.status == 308
            assert moved.headers["Location"] == "https://app.example.com/a/b?c=d"
            port["https"] = 8443
            moved = await http.get("/", headers={"Host": "App.Example.com:80"},
                                   allow_redirects=False)  # fmt: skip
            assert moved.headers["Location"] == "https://app.example.com:8443/"
            assert (await http.get("/", headers={"Host": "evil.example.com"})).status == 404
            plain.set_challenges([])
            assert (
                await http.get(
                    "/.well-known/acme-challenge/tok-1", headers={"Host": "app.example.com"}
                )
            ).status == 404

    asyncio.run(scenario())


def test_a_token_is_no_proof_for_another_name() -> None:
    """An attacker holding a token pending for their own domain (or seeing someone else's)
    asks for it under a victim's name, as a CA validating the victim's name would: the gateway
    answers as for an unknown token."""

    async def scenario() -> None:
        plain = PlainHttp(lambda name: True, lambda: 443)
        plain.set_challenges(
            [AcmeChallenge(domain="mine.example.com", token="tok-1", key_authorization="tok-1.k")]
        )
        async with TestClient(TestServer(plain.app())) as http:
            path = "/.well-known/acme-challenge/tok-1"
            for host in ("victim.example.com", "127.0.0.1", "mine.example.com.evil.test", ""):
                answer = await http.get(path, headers={"Host": host})
                assert answer.status == 404, host
                assert await answer.text() == "unknown ACME challenge token\n"
            ok = await http.get(path, headers={"Host": "MINE.example.com:80"})
            assert ok.status == 200 and await ok.text() == "tok-1.k"

    asyncio.run(scenario())
