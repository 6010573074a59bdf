"""The gateway's plain-HTTP port: ACME HTTP-01 tokens answered, everything else for a served
name redirected to HTTPS with 308, other names refused."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from kakuremichi.edge.http_port import PlainHttp
from kakuremichi.protocol import AcmeChallenge


def test_challenges_redirects_and_unknown_names() -> None:
    async def scenario() -> None:
        port = {"https": 443}
        plain = PlainHttp(lambda name: name == "app.example.com", lambda: port["https"])
        plain.set_challenges(
            [AcmeChallenge(domain="app.example.com", token="tok-1", key_authorization="tok-1.abc")]
        )
        async with TestClient(TestServer(plain.app())) as http:
            answer = await http.get("/.well-known/acme-challenge/tok-1")
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
            assert (await http.get("/.well-known/acme-challenge/tok-1")).status == 404

    asyncio.run(scenario())
