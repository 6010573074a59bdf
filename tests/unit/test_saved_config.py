"""``--state-dir``: an edge keeps the last config it applied and serves it again after a restart,
before control answers; never another edge's, never after control refused its key. (WireGuard is
a recorder here; the end-to-end tier restarts real edges while control is down.)"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from kakuremichi.api import protocol
from kakuremichi.edge.control_client import ControlClient
from kakuremichi.edge.gateway import GatewayEdge
from kakuremichi.edge.saved_config import ConfigFile
from kakuremichi.edge.settings import EdgeSettings
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA
from tests.infra.web import serving
from tests.unit.test_edge_apply import RecordingWireGuard, gateway_config

DOMAIN = "app.example.com"


def settings(
    state_dir: Path,
    api_key: str = "gtw_first",
    url: str = "http://127.0.0.1:1",
    node: str | None = None,
) -> EdgeSettings:
    return EdgeSettings(
        control_url=url, api_key=api_key, listen_address="127.0.0.1", node_name=node,
        http_port=free_port(), https_port=free_port(), state_dir=state_dir,
    )  # fmt: skip


def config(version: int) -> protocol.GatewayConfig:
    issued = TestCA().issue(DOMAIN)
    bundle = protocol.CertificateBundle(
        domain=DOMAIN, certificate=issued.certificate_pem, private_key=issued.private_key_pem
    )
    return gateway_config(version, bundle)


async def started(edge_settings: EdgeSettings) -> GatewayEdge:
    """An edge as ``run`` starts it, up to the point where it would dial control."""
    edge = GatewayEdge(edge_settings)
    edge.wireguard = RecordingWireGuard()
    await edge.restore_saved_config()
    return edge


def test_a_restarted_gateway_serves_its_saved_config_before_control_answers(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        state = tmp_path / "state"
        first = await started(settings(state))
        applied = config(7)
        try:
            await first.apply(applied)
        finally:
            await first.stop()
        saved = state / "gateway-config.json"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # it holds private keys
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert [p.name for p in state.iterdir()] == ["gateway-config.json"]  # no temporary left

        again = await started(settings(state))
        try:
            assert again.front_end.sni.domains() == {DOMAIN}
            assert again.stats.config_version == 7
            assert again.wireguard is not None and again.wireguard.current is not None
            assert again.proxy.routes[DOMAIN].agent_ip == "10.1.0.100"
            assert (await again.status_report()).state == "online"
            # Control's config then applies as usual, whatever its version.
            await again.control._apply(NullSocket(), config(3))  # type: ignore[arg-type]
            assert again.stats.config_version == 3
        finally:
            await again.stop()

    asyncio.run(scenario())


def test_a_config_saved_for_another_key_or_control_is_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        state = tmp_path / "state"
        first = await started(settings(state))
        await first.apply(config(1))
        await first.stop()
        for other in (
            settings(state, api_key="gtw_second"),
            settings(state, url="http://c:1"),
            settings(state, node="node-2"),  # the same pool's key on another node
        ):
            edge = await started(other)
            assert edge.front_end.sni.domains() == set() and edge.stats.config_version == 0
            await edge.stop()

    caplog.set_level(logging.WARNING)
    asyncio.run(scenario())
    assert "saved for another control URL, API key or node" in caplog.text
    assert "gtw_first" not in (tmp_path / "state" / "gateway-config.json").read_text()


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"format": 2}), ""],
    ids=["truncated", "future-format", "empty"],
)
def test_an_unreadable_saved_config_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    async def scenario() -> None:
        edge = await started(settings(tmp_path))
        assert edge.stats.config_version == 0
        await edge.apply(config(2))  # and is replaced by the next applied config
        await edge.stop()

    (tmp_path / "gateway-config.json").write_text(content)
    caplog.set_level(logging.WARNING)
    asyncio.run(scenario())
    assert "ignoring the saved config" in caplog.text
    file = ConfigFile(
        tmp_path, "gateway", protocol.GatewayConfig, "http://127.0.0.1:1", "gtw_first"
    )
    loaded = file.load()
    assert loaded is not None and loaded.config.version == 2


def test_a_config_that_cannot_be_saved_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        blocked = tmp_path / "not-a-directory"
        blocked.write_text("")
        edge = await started(settings(blocked))
        try:
            await edge.apply(config(1))
            assert edge.front_end.sni.domains() == {DOMAIN} and edge.error is None
        finally:
            await edge.stop()

    caplog.set_level(logging.WARNING)
    asyncio.run(scenario())
    assert "cannot save the config" in caplog.text


@asynccontextmanager
async def control_closing_with(code: int) -> AsyncIterator[str]:
    """A control that reads the edge's auth message and closes with ``code``; yields its URL."""

    async def close(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.receive()
        await socket.close(code=code)
        return socket

    async with serving("/ws", close) as port:
        yield f"http://127.0.0.1:{port}"


def test_control_refusing_the_key_removes_the_saved_config(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_closing_with(protocol.CLOSE_UNAUTHORIZED) as url:
            edge = await started(settings(tmp_path, url=url))
            try:
                await edge.apply(config(1))
                assert (tmp_path / "gateway-config.json").exists()
                await session_once(edge.control)
                assert not (tmp_path / "gateway-config.json").exists()
                assert edge.front_end.sni.domains() == {
                    DOMAIN
                }  # what runs keeps running until it stops
            finally:
                await edge.stop()

    asyncio.run(scenario())


def test_control_starting_up_keeps_the_saved_config(tmp_path: Path) -> None:
    """Close code 4503: control has just started and does not know the key yet. Nothing is
    given up: neither the saved config nor the key."""

    async def scenario() -> None:
        async with control_closing_with(protocol.CLOSE_TRY_AGAIN) as url:
            edge = await started(settings(tmp_path, url=url))
            try:
                await edge.apply(config(1))
                for _ in range(3):
                    await session_once(edge.control)
                assert (tmp_path / "gateway-config.json").exists()
                assert edge.control.api_key == "gtw_first"
            finally:
                await edge.stop()

    asyncio.run(scenario())


def test_a_saved_config_that_breaks_the_edge_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong applying it, the edge goes on to dial control, and the next start
    does not stumble on the same file."""

    async def scenario() -> None:
        first = await started(settings(tmp_path))
        await first.apply(config(1))
        await first.stop()

        async def broken(self: GatewayEdge, config: object) -> None:
            raise RuntimeError("unexpected")

        monkeypatch.setattr(GatewayEdge, "apply_config", broken)
        again = await started(settings(tmp_path))  # does not raise
        await again.stop()

    caplog.set_level(logging.ERROR)
    asyncio.run(scenario())
    assert "setting it aside" in caplog.text
    assert not (tmp_path / "gateway-config.json").exists()
    assert (tmp_path / "gateway-config.json.bad").exists()


async def session_once(control: ControlClient) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        await control._session(http)


class NullSocket:
    """Where the control client's acknowledgements and reports go in these tests."""

    async def send_str(self, _: str) -> None: ...
