"""Private keys travel only over TLS (or loopback, when the operator is told to trust it): an edge
on another host gets its WireGuard key over a TLS control channel it verifies, and never over
plain HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kakuremichi.api.resources import AGENT, GATEWAY, TUNNEL
from tests.infra import netns, ports
from tests.infra.cluster import Cluster, unique_name
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA

CLIENT = """
import asyncio, json, ssl, sys
import aiohttp
url, api_key, cafile = sys.argv[1], sys.argv[2], sys.argv[3]
async def main():
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, ssl=context) as ws:
            await ws.send_str(json.dumps({"type": "auth", "apiKey": api_key}))
            print((await ws.receive(timeout=15)).data)
asyncio.run(main())
"""


@pytest.fixture
def remote(make_host: netns.HostFactory) -> tuple[netns.Host, str]:
    """Another host with a link to the machine where control runs, and control's address there."""
    host = make_host("edge")
    root_address, _ = netns.link_root(host, "192.168.243.0")
    return host, str(root_address.ip)


RemoteOperator = Callable[[bool], tuple[OperatorProcess, str]]


@pytest.fixture
def remote_operator(
    kube: Cluster, tmp_path: Path, remote: tuple[netns.Host, str]
) -> Iterator[RemoteOperator]:
    """Start an operator listening on all addresses, with TLS or without; yields (it, ws URL)."""
    started: list[tuple[OperatorProcess, str]] = []
    _, address = remote

    def start(tls: bool) -> tuple[OperatorProcess, str]:
        namespace = unique_name("kmtls")
        kube.kubectl("create", "namespace", namespace)
        workdir = tmp_path / namespace
        workdir.mkdir()
        port = ports.free_port()
        scheme = "https" if tls else "http"
        args = ["--db", f"sqlite:///{workdir / 'k.db'}", "--namespace", namespace,
                "--system-namespace", namespace,
                "--control-listen", f"0.0.0.0:{port}",
                "--control-url", f"{scheme}://{address}:{port}"]  # fmt: skip
        ca_file = None
        if tls:
            ca = TestCA()
            serving = ca.issue(address, "127.0.0.1")
            (workdir / "tls.crt").write_text(serving.certificate_pem)
            (workdir / "tls.key").write_text(serving.private_key_pem)
            ca_file = workdir / "ca.pem"
            ca_file.write_text(ca.pem)
            args += ["--control-tls-cert", str(workdir / "tls.crt"),
                     "--control-tls-key", str(workdir / "tls.key")]  # fmt: skip
        process = OperatorProcess(
            kube=kube, namespace=namespace, db_path=workdir / "k.db",
            log_path=workdir / "operator.log", control_url=f"{scheme}://127.0.0.1:{port}",
            args=args, ca_file=ca_file,
        )  # fmt: skip
        process.start()
        started.append((process, namespace))
        return process, f"{'wss' if tls else 'ws'}://{address}:{port}/ws"

    yield start
    for process, namespace in started:
        process.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def first_config(host: netns.Host, url: str, api_key: str, cafile: str = "") -> dict[str, Any]:
    config: dict[str, Any] = json.loads(
        host.exec(sys.executable, "-c", CLIENT, url, api_key, cafile)
    )
    return config


def agent_key(kube: Cluster, namespace: str) -> str:
    agents = Objects(kube, namespace, AGENT)
    agents.create("remote")
    status = agents.ready("remote")
    return (Secrets(kube, namespace).read(status["credentialsSecret"]) or {})["apiKey"]


def test_a_remote_edge_gets_its_key_over_tls(
    kube: Cluster, remote_operator: RemoteOperator, remote: tuple[netns.Host, str]
) -> None:
    process, url = remote_operator(True)
    config = first_config(remote[0], url, agent_key(kube, process.namespace), str(process.ca_file))
    assert config["data"]["agent"]["wireguardPrivateKey"]


def test_a_remote_edge_never_gets_its_key_over_plain_http(
    kube: Cluster, remote_operator: RemoteOperator, remote: tuple[netns.Host, str]
) -> None:
    process, url = remote_operator(False)
    config = first_config(remote[0], url, agent_key(kube, process.namespace))
    assert config["type"] == "config"
    assert "wireguardPrivateKey" not in config["data"]["agent"]


def test_a_remote_gateway_gets_no_certificate_keys_over_plain_http(
    kube: Cluster, remote_operator: RemoteOperator, remote: tuple[netns.Host, str]
) -> None:
    process, url = remote_operator(False)
    namespace = process.namespace
    gateways = Objects(kube, namespace, GATEWAY)
    name = unique_name("plain")
    gateways.create(name, {"mode": "External", "publicIP": "203.0.113.77"})
    status = gateways.ready(name)
    gateway_key = (Secrets(kube, namespace).read(status["credentialsSecret"]) or {})["apiKey"]
    Objects(kube, namespace, AGENT).create("home")
    domain = f"{unique_name('plain')}.example.com"
    issued = TestCA().issue(domain)
    Secrets(kube, namespace).put_tls("plain-tls", issued.certificate_pem, issued.private_key_pem)
    tunnels = Objects(kube, namespace, TUNNEL)
    tunnels.create("plain", {"domain": domain, "agent": "home", "target": "localhost:8080",
                             "tls": {"issuer": "Secret", "secretName": "plain-tls"}})  # fmt: skip
    # Held (no agent needs to be connected for the gateway to get its route).
    held = ("Serving", "AgentOffline")
    wait_until(lambda: (tunnels.condition("plain") or {}).get("reason") in held,
               "the Tunnel to hold its domain")  # fmt: skip
    config = first_config(remote[0], url, gateway_key)
    assert [t["domain"] for t in config["data"]["tunnels"]] == [domain]
    assert config["data"]["certificates"] == []
    assert "wireguardPrivateKey" not in config["data"]["gateway"]
    gateways.delete_all()


def test_an_external_gateway_without_address_takes_the_one_it_connects_from(
    kube: Cluster, remote_operator: RemoteOperator, remote: tuple[netns.Host, str]
) -> None:
    process, url = remote_operator(False)
    gateways = Objects(kube, process.namespace, GATEWAY)
    name = unique_name("roaming")
    gateways.create(name, {"mode": "External"})
    status = gateways.ready(name, "False", "WaitingForAddress")
    key = (Secrets(kube, process.namespace).read(status["credentialsSecret"]) or {})["apiKey"]
    host, _ = remote
    config = first_config(host, url, key)
    assert config["type"] == "config"
    assert config["data"]["gateway"]["publicIp"] == host.address
    status = gateways.ready(name, "True", "Provisioned")
    assert status["publicIP"] == host.address
    assert status["instances"][0]["publicIP"] == host.address
    gateways.delete_all()


def test_loopback_is_not_trusted_with_keys_unless_the_operator_is_told_so(
    kube: Cluster, remote_operator: RemoteOperator
) -> None:
    """A mesh sidecar relays other hosts' connections from 127.0.0.6: loopback alone proves
    nothing (``--trust-loopback`` is for setups where it does)."""
    process, _ = remote_operator(False)
    url = process.control_url.replace("http://", "ws://") + "/ws"
    config: dict[str, Any] = json.loads(subprocess.run(
        [sys.executable, "-c", CLIENT, url, agent_key(kube, process.namespace), ""],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    assert config["type"] == "config"
    assert "wireguardPrivateKey" not in config["data"]["agent"]
