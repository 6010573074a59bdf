"""The gateway's plain-HTTP port: ACME HTTP-01 answers, and a 308 to HTTPS for everything else.

A token is answered only to requests for its own domain (their Host): a token pending for one
tenant's domain is no proof of control over any other name this gateway serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web

from kakuremichi.api.protocol import AcmeChallenge
from kakuremichi.edge.https_proxy import host_name

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class PlainHttp:
    def __init__(self, served: Callable[[str], bool], https_port: Callable[[], int]) -> None:
        self._served = served
        self._https_port = https_port
        self._challenges: dict[tuple[str, str], str] = {}
        """(domain, token) → key authorization."""

    def set_challenges(self, challenges: Iterable[AcmeChallenge]) -> None:
        self._challenges = {(c.domain, c.token): c.key_authorization for c in challenges}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        name = host_name(request.host.encode("ascii", "replace"))
        if path.startswith(CHALLENGE_PREFIX):
            answer = self._challenges.get((name, path[len(CHALLENGE_PREFIX) :]))
            if answer is None:  # (the same answer for a token of another name)
                raise web.HTTPNotFound(text="unknown ACME challenge token\n")
            return web.Response(text=answer, content_type="application/octet-stream")
        if not self._served(name):
            raise web.HTTPNotFound(text=f"no tunnel serves {name or 'this name'} here\n")
        port = self._https_port()
        authority = name if port == 443 else f"{name}:{port}"
        raise web.HTTPPermanentRedirect(f"https://{authority}{request.path_qs}")
