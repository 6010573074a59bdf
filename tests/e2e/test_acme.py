"""ACME end to end against Pebble: a Tunnel with the default TLS settings gets a publicly
trusted (here: Pebble-trusted) certificate through HTTP-01 answered by the gateway, serves it,
renews it, reports failures with backoff, and takes everything with it when deleted.

Pebble runs with its default rate of rejected nonces; its ``shortlived`` profile (60 s) makes
renewal come within the test. The gateway's public address is its address on the link to the
root namespace, where Pebble and the operator's self-check reach its HTTP port.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from kakuremichi.api.resources import AGENT, CERTIFICATE, TUNNEL
from tests.e2e.world import World, running_world, skip_unless_possible
from tests.infra import binaries, pebble
from tests.infra.cluster import Cluster, unique_name
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import holds_for, wait_until

pytestmark = pytest.mark.acme
GATEWAY_ROOT_SIDE = "192.168.252.2"  # running_world's gateway end of its link to the root
RIVAL = unique_name("rival")
"""A second namespace the operator watches: another tenant."""


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    skip_unless_possible()
    reason = binaries.missing("pebble", "pebble-challtestsrv")
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("acme")
    server = pebble.start(
        workdir / "pebble", default_ipv4=GATEWAY_ROOT_SIDE, short_validity_seconds=60
    )
    kube.kubectl("create", "namespace", RIVAL)
    try:
        operator_args = [
            "--acme-directory", server.directory_url, "--acme-ca-file", str(server.ca_bundle),
            "--acme-email", "admin@example.com", "--acme-profile", "shortlived",
            "--acme-retry-base", "1", "--namespace", RIVAL,
        ]  # fmt: skip
        with running_world(
            kube, workdir, public_on_root_link=True, operator_args=operator_args
        ) as made:
            root = workdir / "pebble-root.pem"
            root.write_text(server.root_pem())
            made.client_ca_file = root
            try:
                yield made
            finally:
                for kind in (TUNNEL, AGENT):
                    Objects(kube, RIVAL, kind).delete_all()
    finally:
        server.stop()
        kube.kubectl("delete", "namespace", RIVAL, "--wait=false", check=False)


def certificates(world: World) -> Objects:
    return Objects(world.kube, world.namespace, CERTIFICATE)


def status_of(world: World, name: str) -> dict[str, Any]:
    return dict((certificates(world).get(name) or {}).get("status") or {})


def served_serial(world: World, domain: str) -> str:
    """The serial of the certificate the gateway presents for ``domain``."""
    chain = world.client_host.exec(
        "sh", "-c",
        f"openssl s_client -connect {domain}:443 -servername {domain} </dev/null 2>/dev/null"
        " | openssl x509 -noout -serial",
        check=False,
    )  # fmt: skip
    return chain.strip()


def secret_serial(world: World, name: str) -> str:
    chain = (Secrets(world.kube, world.namespace).read(name) or {}).get("tls.crt", "")
    return world.client_host.exec(
        "openssl", "x509", "-noout", "-serial", input_text=chain, check=False
    ).strip()


def test_a_tunnel_gets_a_certificate_serves_it_and_renews_it(world: World) -> None:
    world.tunnels.create(
        "app", {"domain": world.domain, "agent": "web", "target": "localhost:8080"}
    )
    issued = certificates(world).ready("app", timeout=120)
    assert issued["notBefore"] and issued["notAfter"] and issued["renewalTime"]
    secret = Secrets(world.kube, world.namespace).read("app-tls") or {}
    assert secret["tls.crt"].count("BEGIN CERTIFICATE") >= 2  # leaf and intermediate
    assert "PRIVATE KEY" in secret["tls.key"]
    world.tunnels.ready("app")
    # curl checks the chain against Pebble's root and the name.
    wait_until(lambda: world.get("/")[0] == 200, "HTTPS with the ACME certificate", timeout=30)
    with sqlite3.connect(world.operator.db_path) as db:
        row = db.execute(
            "SELECT expires_at, last_renewed_at FROM certificates WHERE domain = ?",
            (world.domain,),
        ).fetchone()
    assert row is not None and all(row)

    first = secret_serial(world, "app-tls")

    def renewal_started() -> datetime | None:
        """When the renewal was seen to start: its order in status, or the renewed
        certificate (issued after its start) when the whole renewal came between two looks."""
        status = status_of(world, "app")
        if status.get("notBefore") != issued["notBefore"]:
            return datetime.fromisoformat(status["notBefore"])
        return datetime.now(UTC) if status.get("orderURL") else None

    started = wait_until(renewal_started, "the renewal to start", timeout=120)
    # Renewed ahead of time (ARI's window, else 2/3 of the lifetime), not only once expired.
    # (When it ends depends on the machine's load: it may finish after the old one expired.)
    assert started < datetime.fromisoformat(issued["notAfter"]), (started, issued)
    renewed = wait_until(
        lambda: (s := status_of(world, "app")).get("notBefore") != issued["notBefore"] and s,
        "the renewal of the 60-second certificate",
        timeout=120,
    )
    assert renewed["notAfter"] > issued["notAfter"]
    wait_until(
        lambda: served_serial(world, world.domain) == secret_serial(world, "app-tls") != first,
        "the renewed certificate to be served",
        timeout=30,
    )
    assert world.get("/")[0] == 200


def test_a_gateway_that_cannot_serve_the_token_fails_with_backoff_then_recovers(
    world: World,
) -> None:
    # The gateway listens for HTTP elsewhere than its Gateway says, so the token is not served
    # where the CA (and control's self-check) look for it.
    assert world.gateway is not None
    world.gateway.kill()
    world.gateway = world.start_gateway(world.gateway_host, world.node, "--http-port", "8081")
    domain = f"broken.{world.domain}"
    world.tunnels.create("broken", {"domain": domain, "agent": "web", "target": "localhost:8080"})
    # While the token waits (the self-check fails for 10 s an attempt), ask the gateway for it
    # as a CA validating another of its names would: it is no proof for any other Host.
    saved = world.state_dir(f"gateway-{world.node}") / "gateway-config.json"

    def pending_token() -> str | None:
        challenges = json.loads(saved.read_text())["config"].get("acmeChallenges") or []
        return next((c["token"] for c in challenges if c["domain"] == domain), None)

    token = wait_until(pending_token, "the token in the gateway's config", timeout=60)

    def answer(host: str) -> str:
        return world.gateway_host.exec(
            "curl", "-s", "-w", " %{http_code}", "-H", f"Host: {host}",
            f"http://127.0.0.1:8081/.well-known/acme-challenge/{token}", check=False,
        )  # fmt: skip

    assert answer(world.domain).endswith(" 404")
    assert answer(f"other.{world.domain}").endswith(" 404")
    assert answer(domain).startswith(f"{token}.")
    failed = certificates(world).ready("broken", "False", "AcmeChallengeNotServed", timeout=60)
    assert f"do not serve the HTTP-01 token for {domain}" in (
        certificates(world).condition("broken") or {}
    ).get("message", "")
    assert failed["failedAttempts"] >= 1 and failed["nextAttemptAt"]
    # The delay doubles with each failure (base 1 s here).
    wait_until(
        lambda: (
            "(attempt 2; next in 2s)"
            in (certificates(world).condition("broken") or {}).get("message", "")
        ),
        "a second failed attempt, retried after twice the delay",
        timeout=60,
    )
    events = world.kube.kubectl(
        "get", "events", "-n", world.namespace,
        "--field-selector", "involvedObject.name=broken,reason=AcmeChallengeNotServed",
    )  # fmt: skip
    assert "AcmeChallengeNotServed" in events

    world.gateway.kill()
    world.gateway = world.start_gateway(world.gateway_host, world.node)
    recovered = certificates(world).ready("broken", timeout=120)
    assert "failedAttempts" not in recovered and "orderURL" not in recovered


def test_deleting_the_tunnel_takes_certificate_secret_and_row(world: World) -> None:
    secrets = Secrets(world.kube, world.namespace)
    assert secrets.read("broken-tls") is not None
    world.tunnels.delete("broken")
    wait_until(lambda: certificates(world).get("broken") is None, "the Certificate to go")
    wait_until(lambda: secrets.read("broken-tls") is None, "its Secret to go")

    def row_gone() -> bool:  # (the operator sees the deletion after the API server does)
        with sqlite3.connect(world.operator.db_path) as db:
            return not db.execute(
                "SELECT 1 FROM certificates WHERE domain = ?", (f"broken.{world.domain}",)
            ).fetchall()

    wait_until(row_gone, "the certificate's mirror row to go")


def orders_at_pebble(world: World) -> int:
    """Orders Pebble has taken so far (it logs each)."""
    log = world.workdir / "pebble" / "pebble.log"
    return log.read_text(errors="replace").count("Added order")


def test_no_order_for_a_claim_from_another_namespace(world: World) -> None:
    """A rival namespace claims a domain another namespace's Tunnel holds, with the default
    ACME settings: the CA is never asked (not one more order at Pebble, which would even
    reuse the holder's valid authorization for the same account), and the rival gets no
    certificate. (Last in the module: with every other ACME Tunnel gone, Pebble's order count
    moves only for the rival.)"""
    world.tunnels.delete("app")
    wait_until(lambda: certificates(world).get("app") is None, "the first Tunnel's Certificate")
    domain = f"held.{world.domain}"
    world.create_tunnel("held", domain)  # its certificate from a Secret: no order of its own
    world.tunnels.ready("held")
    world.tunnels.wait_past_creation("held")
    before = orders_at_pebble(world)
    Objects(world.kube, RIVAL, AGENT).create("web")
    rivals = Objects(world.kube, RIVAL, TUNNEL)
    rivals.create("app", {"domain": domain, "agent": "web", "target": "localhost:80"})
    rival_certificates = Objects(world.kube, RIVAL, CERTIFICATE)
    rival_certificates.ready("app", "False", "DomainNotHeld")
    rivals.ready("app", "False", "DomainConflict")
    holds_for(
        lambda: (
            orders_at_pebble(world) == before
            and (rival_certificates.condition("app") or {}).get("reason") == "DomainNotHeld"
        ),
        "no order for the rival's claim",
        seconds=5.0,
    )
    assert Secrets(world.kube, RIVAL).read("app-tls") is None
    assert domain not in (world.workdir / "pebble" / "pebble.log").read_text(errors="replace")
    rivals.delete("app")
