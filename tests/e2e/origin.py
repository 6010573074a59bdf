"""The end-to-end tests' origin: the demo origin (hack/demo_origin.py, which holds every route)
with a plain greeting at ``/``. ``python origin.py HOST PORT``."""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

import demo_origin
from demo_origin import pattern_bytes

__all__ = ["app", "pattern_bytes"]


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from the origin\n")


def app() -> web.Application:
    return demo_origin.app(root=hello)


if __name__ == "__main__":
    web.run_app(app(), host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
