"""Two tenants behind one gateway, end to end: the operator watches two namespaces, each with
a real agent in a network namespace of its own. The rival namespace claims the domain the first
one already serves, with a certificate for it that the client even trusts, and an origin that
logs every request it gets. Whatever happens to the holder (its Agent deleted and re-created,
the operator restarted), the rival's origin never receives a request and the gateway never
presents the rival's certificate for that name."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from kakuremichi.api.resources import AGENT, TUNNEL
from tests.e2e.world import CONTROL_NAME, Edge, World, running_world, skip_unless_possible
from tests.infra import netns
from tests.infra.cluster import Cluster, unique_name
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until

LOGGING_ORIGIN = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(sys.argv[2], "a") as log:
            log.write(f"{self.headers.get('Host')} {self.path}\\n")
        body = b"rival origin\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

LOAD = """
import os, ssl, sys, time, urllib.error, urllib.request
tls = ssl.create_default_context(cafile=sys.argv[2])
seen = {}
while not os.path.exists(sys.argv[3]):
    try:
        with urllib.request.urlopen(sys.argv[1], context=tls, timeout=2) as response:
            outcome = f"{response.status} {response.read().decode().strip()}"
    except urllib.error.HTTPError as error:
        outcome = str(error.code)
    except Exception as error:
        outcome = type(error).__name__
    seen[outcome] = seen.get(outcome, 0) + 1
    time.sleep(0.05)
print(repr(seen))
"""


@dataclass
class Rival:
    namespace: str
    host: netns.Host
    agent: Edge
    hijack_log: Path
    """Every request the origin behind the rival's hijacking Tunnel receives."""
    own_log: Path

    @property
    def agents(self) -> Objects:
        return Objects(self.world.kube, self.namespace, AGENT)

    @property
    def tunnels(self) -> Objects:
        return Objects(self.world.kube, self.namespace, TUNNEL)

    world: World


@pytest.fixture(scope="module")
def worlds(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[World, Rival]]:
    skip_unless_possible()
    rival_namespace = unique_name("rival")
    kube.kubectl("create", "namespace", rival_namespace)
    workdir = tmp_path_factory.mktemp("tenants")
    try:
        with running_world(kube, workdir, operator_args=["--namespace", rival_namespace]) as made:
            made.create_tunnel("shop", made.domain)
            made.tunnels.ready("shop")
            wait_until(lambda: made.get("/")[0] == 200, "the holder's first answer", timeout=60)
            # The rival's site: its own host, reaching the gateway's public address over a
            # link of its own, and control over another.
            host = netns.Host("rival")
            made.extra_hosts.append(host)
            netns.link(made.gateway_host, host, "192.168.242.0")
            netns.link_root(host, "192.168.243.0")
            host.exec("ip", "route", "add", f"{made.gateway_public_ip}/32", "via", "192.168.242.1")
            host.set_hosts({CONTROL_NAME: made.control_ip})
            logs = (workdir / "hijack-origin.log", workdir / "own-origin.log")
            for port, log in zip((8080, 8081), logs, strict=True):
                log.touch()
                host.spawn([sys.executable, "-c", LOGGING_ORIGIN, str(port), str(log)])
            Objects(kube, rival_namespace, AGENT).create("web")
            # (Beside the first agent's, its wireguard-go needs a socket name of its own.)
            agent = made.start_agent(
                rival_namespace, "web", host, "", "--wireguard-interface", "kmagent1"
            )
            rival = Rival(rival_namespace, host, agent, logs[0], logs[1], made)
            try:
                yield made, rival
            finally:
                for kind in (TUNNEL, AGENT):
                    Objects(kube, rival_namespace, kind).delete_all()
    finally:
        kube.kubectl("delete", "namespace", rival_namespace, "--wait=false", check=False)


def served_certificate(world: World, domain: str) -> str:
    """The PEM the gateway presents for ``domain``."""
    return world.client_host.exec(
        "sh", "-c",
        f"openssl s_client -connect {domain}:443 -servername {domain} </dev/null 2>/dev/null"
        " | openssl x509",
        check=False,
    )  # fmt: skip


def test_the_rivals_own_tunnel_works(worlds: tuple[World, Rival]) -> None:
    """So that what the next test sees not happening could happen: the rival's agent is up
    and the gateway reaches it."""
    world, rival = worlds
    domain = f"own.{rival.namespace}.e2e.test"
    issued = world.ca.issue(domain)
    Secrets(world.kube, rival.namespace).put_tls(
        "own-tls", issued.certificate_pem, issued.private_key_pem
    )
    rival.tunnels.create(
        "own",
        {"domain": domain, "agent": "web", "target": "localhost:8081",
         "tls": {"issuer": "Secret", "secretName": "own-tls"}},
    )  # fmt: skip
    rival.tunnels.ready("own")
    wait_until(
        lambda: world.curl("--resolve", f"{domain}:443:{world.gateway_client_ip}",
                           f"https://{domain}/").stdout == "rival origin\n",
        "the rival's own tunnel to answer", timeout=60,
    )  # fmt: skip
    assert domain in rival.own_log.read_text()


def test_a_younger_claim_in_another_namespace_never_receives_a_request(
    worlds: tuple[World, Rival],
) -> None:
    world, rival = worlds
    # The rival claims the holder's domain with a certificate the client trusts.
    issued = world.ca.issue(world.domain)
    Secrets(world.kube, rival.namespace).put_tls(
        "hijack-tls", issued.certificate_pem, issued.private_key_pem
    )
    rival.tunnels.create(
        "hijack",
        {"domain": world.domain, "agent": "web", "target": "localhost:8080",
         "tls": {"issuer": "Secret", "secretName": "hijack-tls"}},
    )  # fmt: skip
    conflict = rival.tunnels.ready("hijack", "False", "DomainConflict")["conditions"][0]
    assert conflict["message"] == f"{world.domain} is already claimed by another namespace"
    holders_certificate = served_certificate(world, world.domain)
    assert "BEGIN CERTIFICATE" in holders_certificate

    stop = world.workdir / "stop-load"
    load = subprocess.Popen(
        world.client_host.command(sys.executable, "-c", LOAD, f"https://{world.domain}/",
                                  str(world.ca_file), str(stop)),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        # The holder's Agent is deleted (its site being rebuilt): the domain answers 503 and
        # stays the holder's.
        assert world.agent is not None
        world.agents.delete("web")
        world.tunnels.ready("shop", "False", "AgentNotReady")
        wait_until(lambda: world.get("/")[0] == 503, "503 while the holder has no agent")
        assert served_certificate(world, world.domain) == holders_certificate
        time.sleep(3)  # long enough for a push to the rival, were one to come
        # ... and re-created, with new keys: a new Pod gets a sidecar with them.
        world.agent.kill()
        client.CoreV1Api(world.kube.api_client()).delete_namespaced_pod("web-0", world.namespace)
        world.agents.create("web")
        world.agent = world.start_agent(world.namespace, "web", world.agent_host, "web-1")
        world.tunnels.ready("shop")
        wait_until(lambda: world.get("/")[0] == 200, "the holder serving again", timeout=60)
        # The operator restarts: the rival's claim must not win while the holder's waits for
        # its reconcile.
        world.operator.restart()
        wait_until(lambda: world.tunnels.condition("shop") is not None, "the operator back")
        time.sleep(3)
        rival.tunnels.ready("hijack", "False", "DomainConflict")
        world.tunnels.ready("shop")
    finally:
        stop.touch()
        out, _ = load.communicate(timeout=60)
    outcomes = set(ast.literal_eval(out.strip() or "{}"))
    assert rival.hijack_log.read_text() == "", "the rival's origin received the holder's traffic"
    assert "rival origin" not in " ".join(outcomes), outcomes
    # Served by the holder, or answered by the gateway while the holder's agent was away
    # (502 for the moment the new agent had its address and not yet its connection).
    assert {"200 hello from the origin", "503"} <= outcomes, outcomes
    assert all(o == "200 hello from the origin" or o in ("502", "503") or not o[0].isdigit()
               for o in outcomes), outcomes  # fmt: skip
    assert served_certificate(world, world.domain) == holders_certificate
    assert holders_certificate.strip() != issued.certificate_pem.strip()
