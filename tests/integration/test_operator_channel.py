"""The control channel as an edge meets it: a bad key is refused and learns nothing, a good one
gets its config in the document's shape, changes are pushed within a second, a newer connection
replaces an older one, and the Agent's state follows the connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, TUNNEL
from kakuremichi.control.credentials import generate_api_key
from tests.infra.cluster import Cluster, unique_name
from tests.infra.fixtures import OperatorProcess, local_operator
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.raw_websocket import close_code, frame, upgrade_request
from tests.infra.tlsgen import TestCA


@pytest.fixture
def agent(
    kube: Cluster, operator: OperatorProcess
) -> Iterator[tuple[Objects, dict[str, Any], str]]:
    agents = Objects(kube, operator.namespace, AGENT)
    name = unique_name("edge")
    agents.create(name)
    status = agents.ready(name)
    secret = Secrets(kube, operator.namespace).read(status["credentialsSecret"])
    assert secret is not None
    yield agents, status, secret["apiKey"]
    Objects(kube, operator.namespace, TUNNEL).delete_all()
    agents.delete_all()


async def exchange(url: str, first: str | bytes, wait: float = 3.0) -> tuple[int | None, list[str]]:
    """Send one first frame; return the close code and every text frame received."""
    received: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
        await (ws.send_bytes(first) if isinstance(first, bytes) else ws.send_str(first))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame = await ws.receive(timeout=deadline - time.monotonic())
            except TimeoutError:
                break
            if frame.type == aiohttp.WSMsgType.TEXT:
                received.append(frame.data)
            elif frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
        return ws.close_code, received


def auth(api_key: str) -> str:
    return protocol.encode(protocol.AuthMessage(api_key=api_key))


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (auth(generate_api_key("agent")), protocol.CLOSE_UNAUTHORIZED),
        ("not json", protocol.CLOSE_BAD_REQUEST),
        (json.dumps({"type": "heartbeat"}), protocol.CLOSE_BAD_REQUEST),
        (b"\x00binary", protocol.CLOSE_BAD_REQUEST),
        (json.dumps({"type": "auth", "apiKey": "agt_" + "a" * 5000}), protocol.CLOSE_BAD_REQUEST),
    ],
    ids=["unknown-key", "not-json", "not-auth", "binary", "oversized"],
)
def test_refusals_reveal_nothing(operator: OperatorProcess, first: str | bytes, code: int) -> None:
    close_code, frames = refused(operator, first)
    assert close_code == code
    assert frames == []


def refused(operator: OperatorProcess, first: str | bytes) -> tuple[int | None, list[str]]:
    """The answer to ``first`` once control has started (before, an unknown key is asked to
    come back: it may be one control has not re-learned yet)."""

    def answer() -> tuple[int | None, list[str]] | None:
        code, frames = asyncio.run(exchange(operator.control_url, first))
        return None if code == protocol.CLOSE_TRY_AGAIN else (code, frames)

    return wait_until(answer, "control to know every key")


def test_before_auth_the_operator_reads_4_kib_and_inflates_nothing(
    operator: OperatorProcess,
) -> None:
    """Raw frames at the real operator, as an attacker writes them: a header announcing a
    megabyte, a flood of empty pings from a client that does not read its pongs, a compressed
    frame. Each is refused at once, with nothing buffered or inflated."""
    port = int(operator.control_url.rsplit(":", 1)[1])

    async def attempt(data: bytes, offer: bytes = b"", read_after: float = 0) -> tuple[Any, ...]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(port).replace(b"\r\n\r\n", b"\r\n" + offer + b"\r\n"))
        head = await reader.readuntil(b"\r\n\r\n")
        started = time.monotonic()
        writer.write(data)
        await asyncio.sleep(read_after)  # (not reading meanwhile)
        code = None
        with contextlib.suppress(ConnectionError):
            code = await close_code(reader)
        writer.close()
        return code, head, time.monotonic() - started

    def too_large() -> float:
        with urllib.request.urlopen(f"{operator.control_url}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith('kakuremichi_auth_failures_total{reason="too_large"}'):
                    return float(line.split()[1])
        return 0.0

    before = too_large()
    code, _, took = asyncio.run(attempt(frame(b"", announce=1 << 20)))
    assert code == protocol.CLOSE_BAD_REQUEST and took < 3
    code, _, took = asyncio.run(attempt(frame(b"", opcode=0x9) * 20_000, read_after=3))
    assert code in (protocol.CLOSE_BAD_REQUEST, None) and took < 10  # (None: reset mid-write)
    deflate = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    compressed = bytearray(frame(b"\x4a\x4c\x04\x00"))
    compressed[0] |= 0x40  # RSV1
    code, head, _ = asyncio.run(attempt(bytes(compressed), offer=deflate))
    assert b"deflate" not in head.lower() and code != protocol.CLOSE_UNAUTHORIZED
    assert too_large() >= before + 2


def test_a_restarted_control_asks_edges_back_instead_of_refusing_them(
    operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    """Right after a restart control has not re-learned every key: a valid key is answered
    "come back" (4503) until it is known, never refused; once every Agent and Gateway has been
    reconciled, an unknown key is refused as before."""
    _, _, api_key = agent
    operator.restart()  # returns as soon as the channel answers
    codes: list[int | None] = []

    def accepted() -> bool:
        code, frames = asyncio.run(exchange(operator.control_url, auth(api_key), wait=3.0))
        codes.append(code)
        return any(json.loads(f)["type"] == "config" for f in frames)

    wait_until(accepted, "the agent's key to be accepted again", timeout=60, interval=0.05)
    assert protocol.CLOSE_UNAUTHORIZED not in codes, codes
    assert refused(operator, auth(generate_api_key("agent")))[0] == protocol.CLOSE_UNAUTHORIZED


def test_no_auth_within_ten_seconds_is_closed(operator: OperatorProcess) -> None:
    async def silent() -> int | None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{operator.control_url}/ws") as ws,
        ):
            frame = await ws.receive(timeout=15)
            assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return ws.close_code

    started = time.monotonic()
    assert asyncio.run(silent()) == protocol.CLOSE_BAD_REQUEST
    assert 9 <= time.monotonic() - started < 14


def test_agent_gets_config_and_pushes_and_its_state_follows(
    kube: Cluster, operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    agents, status, api_key = agent
    name = next(iter(agents.created))
    tunnels = Objects(kube, operator.namespace, TUNNEL)
    secrets = Secrets(kube, operator.namespace)
    domain = f"{unique_name('pushed')}.example.com"
    issued = TestCA().issue(domain)
    secrets.put_tls("pushed-tls", issued.certificate_pem, issued.private_key_pem)

    async def session() -> tuple[dict[str, Any], dict[str, Any], float]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{operator.control_url}/ws") as ws,
        ):
            client = protocol.ClientInfo(version="0.1.0", os="linux", wireguard_mode="userspace")
            await ws.send_str(protocol.encode(protocol.AuthMessage(api_key=api_key, client=client)))
            first = json.loads((await ws.receive(timeout=10)).data)
            await ws.send_str(
                protocol.encode(protocol.AckMessage(version=first["data"]["version"]))
            )

            def online() -> dict[str, Any] | None:
                status = (agents.get(name) or {}).get("status", {})
                return status if status.get("state") == "online" else None

            reported = wait_until(online, "online")["client"]
            assert reported == {"version": "0.1.0", "os": "linux", "wireguardMode": "userspace"}
            started = time.monotonic()
            await asyncio.to_thread(
                tunnels.create,
                "pushed",
                {"domain": domain, "agent": name, "target": "localhost:8080",
                 "tls": {"issuer": "Secret", "secretName": "pushed-tls"}},
            )  # fmt: skip
            while True:
                pushed = json.loads((await ws.receive(timeout=30)).data)
                await ws.send_str(protocol.encode(protocol.HeartbeatMessage()))
                if pushed["data"]["tunnels"]:
                    return first, pushed, time.monotonic() - started

    first, pushed, elapsed = asyncio.run(session())
    assert first["type"] == "config"
    assert first["data"]["agent"]["virtualIp"] == status["virtualIP"]
    assert first["data"]["agent"]["subnet"] == status["subnet"]
    assert first["data"]["agent"]["wireguardPrivateKey"]  # loopback: the key may travel
    assert first["data"]["tunnels"] == []
    assert pushed["data"]["version"] > first["data"]["version"]
    assert pushed["data"]["tunnels"] == [
        {"domain": domain, "target": "localhost:8080", "enabled": True}
    ]
    assert elapsed < 5, f"the push took {elapsed:.1f}s"
    wait_until(lambda: (agents.get(name) or {})["status"]["state"] == "offline", "offline")
    assert (agents.get(name) or {})["status"]["lastSeenAt"]


def test_a_newer_connection_replaces_the_older(
    operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    _, _, api_key = agent

    async def two() -> int | None:
        async with aiohttp.ClientSession() as http:
            older = await http.ws_connect(f"{operator.control_url}/ws")
            await older.send_str(auth(api_key))
            await older.receive(timeout=10)
            newer = await http.ws_connect(f"{operator.control_url}/ws")
            await newer.send_str(auth(api_key))
            assert json.loads((await newer.receive(timeout=10)).data)["type"] == "config"
            frame = await older.receive(timeout=10)
            assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await newer.close()
            return older.close_code

    assert asyncio.run(two()) == protocol.CLOSE_REPLACED


def test_a_silent_edge_is_dropped_after_the_heartbeat_timeout(
    operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    agents, _, api_key = agent
    name = next(iter(agents.created))

    async def silent() -> int | None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{operator.control_url}/ws", autoping=False) as ws,
        ):
            await ws.send_str(auth(api_key))
            await ws.receive(timeout=10)
            while True:  # say nothing until control gives up (timeout 5 s in the fixture)
                frame = await ws.receive(timeout=20)
                if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return ws.close_code

    assert asyncio.run(silent()) == protocol.CLOSE_TIMEOUT
    wait_until(lambda: (agents.get(name) or {})["status"]["state"] == "offline", "offline")


def test_health_and_metrics_are_served(
    operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    asyncio.run(exchange(operator.control_url, auth(generate_api_key("agent")), wait=1))
    with urllib.request.urlopen(f"{operator.control_url}/healthz", timeout=5) as response:
        assert json.load(response)["status"] == "ok"
    with urllib.request.urlopen(f"{operator.control_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'kakuremichi_auth_failures_total{reason="unknown_key"}' in text
    assert 'kakuremichi_reconciles_total{kind="Agent",result="ok"}' in text
    assert 'kakuremichi_connected_edges{role="agent"}' in text


def test_edges_stay_connected_and_new_ones_are_served_while_the_api_server_is_away(
    kube: Cluster, operator: OperatorProcess, agent: tuple[Objects, dict[str, Any], str]
) -> None:
    """The API server stops answering (SIGSTOP, as a hung or partitioned one would) for 12 s:
    the connected edge stays connected, an edge that connects meanwhile gets its config from
    the operator's cached state, and both statuses catch up once it answers again."""
    agents, _, first_key = agent
    first = next(iter(agents.created))
    second = unique_name("edge")
    agents.create(second)
    status = agents.ready(second)
    secret = Secrets(kube, operator.namespace).read(status["credentialsSecret"])
    assert secret is not None and kube.state_dir is not None
    second_key = secret["apiKey"]
    api_server = int((kube.state_dir / "kube-apiserver.pid").read_text())

    def state(name: str) -> str | None:
        return ((agents.get(name) or {}).get("status") or {}).get("state")

    async def outage() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            connected = await http.ws_connect(f"{operator.control_url}/ws")
            await connected.send_str(auth(first_key))
            config = json.loads((await connected.receive(timeout=10)).data)
            await connected.send_str(
                protocol.encode(protocol.AckMessage(version=config["data"]["version"]))
            )
            await asyncio.to_thread(wait_until, lambda: state(first) == "online", "online")
            os.kill(api_server, signal.SIGSTOP)
            try:
                newcomer = await http.ws_connect(f"{operator.control_url}/ws")
                await newcomer.send_str(auth(second_key))
                served: dict[str, Any] = json.loads((await newcomer.receive(timeout=10)).data)
                await newcomer.send_str(
                    protocol.encode(protocol.AckMessage(version=served["data"]["version"]))
                )
                deadline = time.monotonic() + 12
                while time.monotonic() < deadline:  # heartbeats through the outage
                    for ws in (connected, newcomer):
                        await ws.send_str(protocol.encode(protocol.HeartbeatMessage()))
                        with contextlib.suppress(TimeoutError):
                            frame = await ws.receive(timeout=0.5)
                            assert frame.type == aiohttp.WSMsgType.TEXT, frame
            finally:
                os.kill(api_server, signal.SIGCONT)
            for ws in (connected, newcomer):
                await ws.send_str(protocol.encode(protocol.HeartbeatMessage()))
            await asyncio.to_thread(
                wait_until, lambda: state(second) == "online", "the newcomer's status", 60
            )
            assert not connected.closed and not newcomer.closed  # never closed by control
            await connected.close()
            await newcomer.close()
            return served

    served = asyncio.run(outage())
    assert (
        served["type"] == "config" and served["data"]["agent"]["virtualIp"] == status["virtualIP"]
    )


def test_connections_waiting_to_authenticate_are_capped_per_address(
    kube: Cluster, tmp_path: Path
) -> None:
    """Before auth nothing is known of a connection: many of them from one address must not
    pile up buffers in the operator (edges behind one NAT still fit under the default)."""
    namespace = unique_name("capped")  # an operator of its own, beside the module's
    kube.kubectl("create", "namespace", namespace)
    capped = local_operator(kube, namespace, tmp_path, "--max-unauthenticated-per-address", "2")
    capped.start()
    try:

        async def pile_up() -> int:
            async with aiohttp.ClientSession() as http:
                held = [await http.ws_connect(f"{capped.control_url}/ws") for _ in range(2)]
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{capped.control_url}/ws")
                await held[0].send_str("not json")  # one is done (refused): a place frees
                await held[0].receive(timeout=10)
                again = await http.ws_connect(f"{capped.control_url}/ws")
                for ws in (*held, again):
                    await ws.close()
                return refused.value.status

        assert asyncio.run(pile_up()) == 503
    finally:
        capped.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
