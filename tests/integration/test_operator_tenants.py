"""Namespaces as tenants, against the real API server: a claim from another namespace never
displaces the holder and learns nothing about it; TenantPolicies limit what a namespace may
claim and run; the operator never writes over a Secret it did not make. Each test plays the
other tenant the way an attacker would."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kakuremichi.api.resources import AGENT, CERTIFICATE, TENANT_POLICY, TUNNEL
from tests.infra.cluster import Cluster, unique_name
from tests.infra.edge_sessions import EdgeSessions
from tests.infra.fixtures import OperatorProcess, local_operator
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import holds_for, wait_until
from tests.infra.tlsgen import TestCA


class Tenant:
    def __init__(self, kube: Cluster, namespace: str, edges: EdgeSessions) -> None:
        self.kube, self.namespace, self.edges = kube, namespace, edges
        self.agents = Objects(kube, namespace, AGENT)
        self.tunnels = Objects(kube, namespace, TUNNEL)
        self.certificates = Objects(kube, namespace, CERTIFICATE)
        self.secrets = Secrets(kube, namespace)
        self.core = client.CoreV1Api(kube.api_client())
        self.ca = TestCA()

    def agent(self, name: str) -> None:
        """An Agent whose edge is connected (a Tunnel serves only while it is)."""
        self.agents.create(name)
        self.edges.connect_agent(self.kube, self.namespace, name)

    def secret_tunnel(self, name: str, domain: str, agent: str = "web") -> None:
        issued = self.ca.issue(domain)
        self.secrets.put_tls(f"{name}-tls", issued.certificate_pem, issued.private_key_pem)
        self.tunnels.create(
            name,
            {"domain": domain, "agent": agent, "target": "localhost:8080",
             "tls": {"issuer": "Secret", "secretName": f"{name}-tls"}},
        )  # fmt: skip

    def events(self, kind: str, name: str) -> list[Any]:
        found = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
        )
        return list(found.items)

    def clear(self) -> None:
        self.tunnels.delete_all()
        self.certificates.delete_all()
        self.agents.delete_all()


@pytest.fixture(scope="module")
def two_namespaces(kube: Cluster) -> Iterator[tuple[str, str]]:
    names = (unique_name("tenant-a"), unique_name("tenant-b"))
    for name in names:
        kube.kubectl("create", "namespace", name)
    yield names
    for name in names:
        kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    kube: Cluster, two_namespaces: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    first, second = two_namespaces
    running = local_operator(kube, first, tmp_path_factory.mktemp("tenants"), "--namespace", second)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def tenants(
    kube: Cluster, operator: OperatorProcess, two_namespaces: tuple[str, str], edges: EdgeSessions
) -> Iterator[tuple[Tenant, Tenant]]:
    made = (Tenant(kube, two_namespaces[0], edges), Tenant(kube, two_namespaces[1], edges))
    yield made
    for tenant in made:
        tenant.clear()


@pytest.fixture
def policies(kube: Cluster, operator: OperatorProcess) -> Iterator[Objects]:
    """TenantPolicies are cluster-wide: every one a test makes goes when it ends, so no other
    test (nor module) finds the cluster governed."""
    made = Objects(kube, "", TENANT_POLICY)
    yield made
    made.delete_all()


def tunnel_rows(operator: OperatorProcess) -> set[tuple[str, uuid.UUID]]:
    """(domain, Tunnel uid) of every row of the mirror's tunnels table."""
    with sqlite3.connect(operator.db_path) as db:
        return {(row[0], uuid.UUID(row[1])) for row in db.execute("SELECT domain, id FROM tunnels")}


def uid(objects: Objects, name: str) -> uuid.UUID:
    return uuid.UUID((objects.get(name) or {})["metadata"]["uid"])


def test_a_claim_from_another_namespace_never_displaces_the_holder_nor_learns_of_it(
    tenants: tuple[Tenant, Tenant], operator: OperatorProcess
) -> None:
    victim, attacker = tenants
    domain = f"{unique_name('shop')}.example.com"
    victim.agent("web")
    victim.secret_tunnel("shop", domain)
    victim.tunnels.ready("shop")
    victim.tunnels.wait_past_creation("shop")
    holder = (domain, uid(victim.tunnels, "shop"))
    attacker.agent("web")
    attacker.secret_tunnel("hijack", domain)
    condition = attacker.tunnels.ready("hijack", "False", "DomainConflict")["conditions"][0]
    younger = (domain, uid(attacker.tunnels, "hijack"))
    assert condition["message"] == f"{domain} is already claimed by another namespace"
    events = " ".join(e.message for e in attacker.events("Tunnel", "hijack"))
    assert victim.namespace not in events and "shop" not in events.replace(domain, "")
    # The holder's Agent goes away (re-created, say): the domain stays the holder's.
    victim.agents.delete("web")
    victim.tunnels.ready("shop", "False", "AgentNotReady")
    wait_until(lambda: holder not in tunnel_rows(operator), "the row to go")
    holds_for(
        lambda: (
            (attacker.tunnels.condition("hijack") or {}).get("reason") == "DomainConflict"
            and younger not in tunnel_rows(operator)
        ),
        "the younger claim to stay unrouted",
        seconds=3.0,
    )
    victim.agent("web")
    victim.tunnels.ready("shop")
    wait_until(lambda: holder in tunnel_rows(operator), "the row back")
    # Only the holder's deletion hands the domain over.
    victim.tunnels.delete("shop")
    attacker.tunnels.ready("hijack")
    wait_until(lambda: younger in tunnel_rows(operator), "the new holder")


def test_policies_limit_the_domains_agents_and_tunnels_of_a_namespace(
    tenants: tuple[Tenant, Tenant], policies: Objects
) -> None:
    team, outsider = tenants
    suffix = f"{unique_name('team')}.test"
    policies.create(
        unique_name("team"),
        {"namespaces": {"matchNames": [team.namespace]}, "domains": [f"*.{suffix}"],
         "maxAgents": 1, "maxTunnels": 1},
    )  # fmt: skip
    # Agents: the oldest fits; the younger gets no subnet, says why, and posts an Event.
    team.agent("web")
    team.agents.ready("web")
    team.agents.wait_past_creation("web")
    team.agents.create("spare")
    refused = team.agents.ready("spare", "False", "QuotaExceeded")
    assert "may run 1 Agents" in refused["conditions"][0]["message"]
    assert "subnet" not in refused
    wait_until(lambda: any(e.reason == "QuotaExceeded" for e in team.events("Agent", "spare")),
               "the QuotaExceeded Event")  # fmt: skip
    # A namespace no policy selects runs no Agent at all (it cannot drain the shared pool).
    outsider.agents.create("web")
    outsider.agents.ready("web", "False", "QuotaExceeded")
    # Domains: only those the policy lists; tunnels: only the oldest maxTunnels.
    team.secret_tunnel("elsewhere", "shop.example.com")
    reason = team.tunnels.ready("elsewhere", "False", "DomainNotAllowed")["conditions"][0]
    assert reason["message"].startswith("spec.domain: shop.example.com is not among")
    team.tunnels.delete("elsewhere")
    team.secret_tunnel("app", f"app.{suffix}")
    team.tunnels.ready("app")
    team.tunnels.wait_past_creation("app")
    team.secret_tunnel("more", f"more.{suffix}")
    team.tunnels.ready("more", "False", "QuotaExceeded")
    # An outsider claiming the team's domain squats nothing, however early it came.
    outsider.secret_tunnel("squat", f"app.{suffix}")
    outsider.tunnels.ready("squat", "False", "DomainNotAllowed")
    # The older Agent leaves: the waiting one is admitted without any event of its own.
    team.agents.delete("web")
    assert team.agents.ready("spare")["subnet"]
    # Limits raised: what waited serves; the policy gone: first claim wins again.
    name = policies.names()[0]
    policies.patch_spec(name, {"maxTunnels": 5})
    team.tunnels.ready("more", "False", "AgentNotReady")  # its Agent "web" is gone
    policies.delete(name)
    outsider.agents.ready("web")


def test_acme_never_writes_over_a_secret_it_did_not_make(tenants: tuple[Tenant, Tenant]) -> None:
    team, _ = tenants
    domain = f"{unique_name('own')}.example.com"
    # A Secret the user made, under the name the Tunnel's Certificate will ask for.
    team.core.create_namespaced_secret(
        team.namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="web-tls"),
                        string_data={"note": "mine, hands off"}),
    )  # fmt: skip

    def version() -> str | None:
        meta = team.core.read_namespaced_secret("web-tls", team.namespace).metadata
        return meta.resource_version if meta else None

    before = version()
    team.agent("web")
    team.tunnels.create("web", {"domain": domain, "agent": "web", "target": "localhost:8080"})
    condition = team.certificates.ready("web", "False", "SecretNotOwned")["conditions"][0]
    assert "left untouched" in condition["message"]
    team.tunnels.ready("web", "False", "SecretNotOwned")
    holds_for(lambda: version() == before, "the user's Secret to stay as it was", seconds=2.0)
    # Deleting the Tunnel leaves it too (its owner references never named the Certificate).
    team.tunnels.delete("web")
    wait_until(lambda: team.certificates.get("web") is None, "the Certificate to go")
    assert team.secrets.read("web-tls") == {"note": "mine, hands off"}


def test_no_order_for_a_certificate_whose_tunnel_does_not_hold_the_domain(
    tenants: tuple[Tenant, Tenant],
) -> None:
    victim, attacker = tenants
    domain = f"{unique_name('bank')}.example.com"
    victim.agent("web")
    victim.secret_tunnel("bank", domain)
    victim.tunnels.ready("bank")
    victim.tunnels.wait_past_creation("bank")
    attacker.agents.create("web")
    attacker.tunnels.create("bank", {"domain": domain, "agent": "web", "target": "localhost:80"})
    condition = attacker.certificates.ready("bank", "False", "DomainNotHeld")["conditions"][0]
    assert "no certificate is ordered" in condition["message"]
    certificate = attacker.certificates.get("bank") or {}
    assert not (certificate.get("status") or {}).get("orderURL")
    attacker.tunnels.ready("bank", "False", "DomainConflict")


def test_a_policy_selects_namespaces_by_their_labels_as_they_change(
    kube: Cluster, tenants: tuple[Tenant, Tenant], policies: Objects
) -> None:
    _, outsider = tenants
    label = unique_name("plan")
    policies.create(
        unique_name("by-label"), {"namespaces": {"matchLabels": {"kakuremichi-test": label}}}
    )
    outsider.agents.create("web")
    outsider.agents.ready("web", "False", "QuotaExceeded")
    kube.kubectl("label", "namespace", outsider.namespace, f"kakuremichi-test={label}")
    try:
        assert outsider.agents.ready("web")["subnet"]  # admitted once its namespace matches
    finally:
        kube.kubectl("label", "namespace", outsider.namespace, "kakuremichi-test-")
    outsider.agents.ready("web", "False", "QuotaExceeded")  # and refused again without it


def test_an_old_tunnel_can_neither_be_repointed_nor_freed_into_a_domain_held_since(
    kube: Cluster, tenants: tuple[Tenant, Tenant], policies: Objects
) -> None:
    """Two ways an attacker's old Tunnel could date a claim back: editing spec.domain (the API
    server refuses it), and an old Tunnel waiting behind its quota that the attacker frees by
    deleting another (its claim begins then, behind the victim's)."""
    attacker, victim = tenants
    suffix = f"{unique_name('apps')}.test"
    policies.create(
        unique_name("shared"),
        {"namespaces": {"matchNames": [attacker.namespace, victim.namespace]},
         "domains": [f"*.{suffix}"], "maxTunnels": 1},
    )  # fmt: skip
    attacker.agent("web")
    attacker.secret_tunnel("decoy", f"decoy.{suffix}")
    attacker.tunnels.ready("decoy")
    attacker.tunnels.wait_past_creation("decoy")
    attacker.secret_tunnel("sleeper", f"shop.{suffix}")
    attacker.tunnels.ready("sleeper", "False", "QuotaExceeded")
    attacker.tunnels.wait_past_creation("sleeper")
    victim.agent("web")
    victim.secret_tunnel("shop", f"shop.{suffix}")
    held = victim.tunnels.ready("shop")
    assert held["claim"]["since"] and held["claim"]["proof"]
    # Re-pointing the decoy at the victim's domain: refused, with the field named.
    with pytest.raises(client.ApiException) as refused:
        attacker.tunnels.patch_spec("decoy", {"domain": f"shop.{suffix}"})
    assert refused.value.status == 422 and "domain cannot be changed" in str(refused.value.body)
    # Freeing the quota: the sleeper claims from now, behind the victim.
    attacker.tunnels.delete("decoy")
    attacker.tunnels.ready("sleeper", "False", "DomainConflict")
    holds_for(
        lambda: (victim.tunnels.condition("shop") or {}).get("reason") == "Serving",
        "the victim to keep its domain",
        seconds=3.0,
    )
