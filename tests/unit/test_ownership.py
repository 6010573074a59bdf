"""Who holds a domain, decided once from every Tunnel whatever the state of its Agent, and what
TenantPolicies let each namespace claim and run. Tried as an attacker in another namespace
would: a younger claim must never receive the holder's traffic or its certificate."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from kakuremichi.api.protocol import AcmeChallenge, CertificateBundle
from kakuremichi.api.resources import TenantPolicySpec, TunnelStatus
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.control.ownership import (
    AgentClaim,
    ClaimHistory,
    PortRules,
    Tenancy,
    TenantRule,
    TunnelFacts,
    decide_agents,
    decide_domains,
)
from kakuremichi.control.projector import claim_proof, restored_claim
from kakuremichi.control.snapshot import ControlFacts, Snapshot
from kakuremichi.control.store import Sealer
from kakuremichi.control.tenancy import rule_of
from kakuremichi.control.topology import AgentNode, GatewayNode, gateway_config
from kakuremichi.control.tunnel_readiness import CertificateVerdict

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DOMAIN = "shop.example.com"


def key() -> str:
    return generate_wireguard_keypair().public_key


VICTIM_AGENT = AgentNode(uuid.uuid4(), "victim", "web", 1, key())
ATTACKER_AGENT = AgentNode(uuid.uuid4(), "attacker", "web", 2, key())
GATEWAY = GatewayNode(uuid.uuid4(), "edge", 1, "203.0.113.1", key())


def tunnel(namespace: str, name: str = "web", minutes: int = 0, domain: str = DOMAIN,
           **changes: object) -> TunnelFacts:  # fmt: skip
    made = TunnelFacts(uuid.uuid4(), namespace, name, domain, "web", "localhost:8080", True,
                       T0 + timedelta(minutes=minutes), 1, name)  # fmt: skip
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def bundle(domain: str = DOMAIN, tag: str = "") -> CertificateBundle:
    return CertificateBundle(domain=domain, certificate=f"CHAIN{tag}", private_key=f"KEY{tag}")


def snapshot(
    *tunnels: TunnelFacts,
    agents: tuple[AgentNode, ...] = (VICTIM_AGENT, ATTACKER_AGENT),
    bundles: dict[tuple[str, str], CertificateBundle] | None = None,
    challenges: dict[tuple[str, str], AcmeChallenge] | None = None,
    tenancy: Tenancy | None = None,
) -> Snapshot:
    facts = ControlFacts(
        tunnels={t.id: t for t in tunnels},
        agents={a.id: a for a in agents},
        gateways={GATEWAY.id: GATEWAY},
        certificate_verdicts={
            (t.namespace, t.name): CertificateVerdict(True, "Valid", "") for t in tunnels
        },
        bundles=bundles or {},
        challenges=challenges or {},
        tenancy=tenancy or Tenancy(),
    )
    return Snapshot(facts, 1)


def routed_to(world: Snapshot) -> dict[str, str | None]:
    """Domain → the agent virtual IP the gateway's config sends it to."""
    config = gateway_config(world.topology, GATEWAY.id, 1)
    return {t.domain: t.agent_virtual_ip for t in config.tunnels}


# --- the hijack and its variants --------------------------------------------------------------


@pytest.mark.parametrize(
    "holder_agents",
    [
        pytest.param((ATTACKER_AGENT,), id="holder's Agent missing or being re-created"),
        pytest.param((), id="no Agent provisioned at all (pool exhausted, late reconcile)"),
    ],
)
def test_a_younger_claim_never_gets_the_route_while_the_holders_agent_is_away(
    holder_agents: tuple[AgentNode, ...],
) -> None:
    victim = tunnel("victim", minutes=0)
    attacker = tunnel("attacker", minutes=5)
    bundles = {("victim", "web"): bundle(tag="-victim"), ("attacker", "web"): bundle(tag="-evil")}
    world = snapshot(victim, attacker, agents=holder_agents, bundles=bundles)
    # Unserved but still the victim's: no agent address (the gateway answers 503) ...
    assert routed_to(world) == {DOMAIN: None}
    (route,) = world.routes
    assert route.tunnel_id == victim.id
    # ... under the victim's certificate, never the attacker's.
    assert world.topology.certificates[DOMAIN].certificate == "CHAIN-victim"
    assert world.verdicts[victim.id].reason == "AgentNotReady"
    assert world.verdicts[attacker.id].reason == "DomainConflict"
    # The attacker's agent is told nothing of the domain.
    assert all(r.agent_id != ATTACKER_AGENT.id for r in world.routes)
    assert world.tunnel_rows == ()


def test_the_holders_own_agent_serves_and_the_younger_claim_in_another_namespace_never() -> None:
    victim, attacker = tunnel("victim"), tunnel("attacker", minutes=5)
    for order in ((victim, attacker), (attacker, victim)):
        world = snapshot(*order)
        assert routed_to(world) == {DOMAIN: VICTIM_AGENT.virtual_ip}
        assert [row.tunnel_id for row in world.tunnel_rows] == [victim.id]


def test_a_disabled_holder_keeps_its_claim() -> None:
    victim = tunnel("victim", enabled=False)
    world = snapshot(victim, tunnel("attacker", minutes=5))
    config = gateway_config(world.topology, GATEWAY.id, 1)
    assert [(t.domain, t.enabled, t.agent_virtual_ip) for t in config.tunnels] == [
        (DOMAIN, False, VICTIM_AGENT.virtual_ip)
    ]
    assert world.ownership.holders[DOMAIN].id == victim.id


def test_the_next_claim_takes_over_only_once_the_holder_is_deleted() -> None:
    victim, attacker = tunnel("victim"), tunnel("attacker", minutes=5)
    assert snapshot(victim, attacker).ownership.holders[DOMAIN].id == victim.id
    after = snapshot(attacker)
    assert after.ownership.holders[DOMAIN].id == attacker.id
    assert routed_to(after) == {DOMAIN: ATTACKER_AGENT.virtual_ip}


def test_claims_of_the_same_second_are_ordered_by_uid_whatever_their_names() -> None:
    a = tunnel("zzz", name="zzz")
    b = dataclasses.replace(tunnel("aaa", name="aaa"), created=a.created)
    first = min((a, b), key=lambda t: t.id)
    for order in ((a, b), (b, a)):
        assert decide_domains(order, Tenancy()).holders[DOMAIN].id == first.id


def test_a_non_holders_certificate_and_tokens_are_never_served() -> None:
    victim, attacker = tunnel("victim"), tunnel("attacker", minutes=5)
    token = AcmeChallenge(domain=DOMAIN, token="evil-token", key_authorization="evil.auth")
    mine = AcmeChallenge(domain=DOMAIN, token="good-token", key_authorization="good.auth")
    world = snapshot(
        victim, attacker,
        bundles={("attacker", "web"): bundle(tag="-evil")},
        challenges={("attacker", "web"): token, ("victim", "web"): mine},
    )  # fmt: skip
    assert DOMAIN not in world.topology.certificates  # the victim has none yet: unknown name
    assert world.topology.challenges == (mine,)
    assert not world.may_issue(("attacker", "web"), DOMAIN)
    assert world.may_issue(("victim", "web"), DOMAIN)
    # A Certificate of the holder's namespace that its Tunnel does not use may not order either.
    assert not world.may_issue(("victim", "other"), DOMAIN)


# --- TenantPolicy -----------------------------------------------------------------------------


def rule(name: str, **fields: object) -> TenantRule:
    spec = TenantPolicySpec.model_validate(fields)
    return TenantRule.from_spec(name, spec)


def test_no_policy_is_first_claim_wins() -> None:
    ownership = decide_domains([tunnel("anyone", domain="any.example.org")], Tenancy())
    assert ownership.refusals == {}


def test_a_policy_lets_its_namespaces_claim_exact_names_and_names_below_a_suffix() -> None:
    team = rule("team-a", namespaces={"matchNames": ["team-a"]},
                domains=["app.example.com", "*.team-a.example.com"])  # fmt: skip
    tenancy = Tenancy((team,))
    allowed = [
        tunnel("team-a", name=f"t{i}", domain=d)
        for i, d in enumerate(["app.example.com", "x.team-a.example.com", "a.b.team-a.example.com"])
    ]
    refused = [
        tunnel("team-a", name="apex", domain="team-a.example.com"),
        tunnel("team-a", name="lookalike", domain="xteam-a.example.com"),
        tunnel("team-a", name="other", domain="other.example.com"),
        tunnel("team-b", name="stranger", domain="app.example.com", minutes=-10),
    ]
    ownership = decide_domains([*allowed, *refused], tenancy)
    assert {t.id for t in allowed} == {h.id for h in ownership.holders.values()}
    reasons = {t.name: ownership.refusals[t.id].reason for t in refused}
    assert set(reasons.values()) == {"DomainNotAllowed"}
    # An older claim from a namespace the policy does not select squats nothing.
    assert ownership.holders["app.example.com"].namespace == "team-a"
    assert "no TenantPolicy selects namespace team-b" in ownership.refusals[refused[3].id].message


def test_policies_select_by_labels_and_an_empty_selector_selects_every_namespace() -> None:
    by_label = rule("prod", namespaces={"matchLabels": {"tier": "prod"}}, domains=["*.prod.test"])
    tenancy = Tenancy((by_label,), {"shop": {"tier": "prod"}, "lab": {"tier": "dev"}})
    ownership = decide_domains(
        [tunnel("shop", domain="a.prod.test"), tunnel("lab", domain="b.prod.test")], tenancy
    )
    assert [h.namespace for h in ownership.holders.values()] == ["shop"]
    everyone = Tenancy((rule("all", namespaces={"matchLabels": {}}, maxTunnels=1),))
    assert everyone.grant("anything").max_tunnels is not None


def test_the_smallest_quota_among_the_selecting_policies_applies_oldest_first() -> None:
    loose = rule("loose", namespaces={"matchNames": ["team"]}, domains=["*.example.com"],
                 maxTunnels=10, maxAgents=5)  # fmt: skip
    tight = rule("tight", namespaces={"matchLabels": {"plan": "free"}}, maxTunnels=2, maxAgents=1)
    tenancy = Tenancy((loose, tight), {"team": {"plan": "free"}})
    tunnels = [tunnel("team", name=f"t{i}", domain=f"t{i}.example.com", minutes=-i)
               for i in range(4)]  # fmt: skip
    ownership = decide_domains(tunnels, tenancy)
    # t3 and t2 are the oldest: they hold; the younger two are over quota, and say so.
    assert {h.name for h in ownership.holders.values()} == {"t3", "t2"}
    over = ownership.refusals[tunnels[0].id]
    assert over.reason == "QuotaExceeded"
    assert "may have 2 Tunnels (TenantPolicy tight)" in over.message
    agents = [
        AgentClaim(uuid.uuid4(), "team", f"a{i}", T0 + timedelta(minutes=i)) for i in range(3)
    ]
    refused = decide_agents(reversed(agents), tenancy)
    assert set(refused) == {agents[1].id, agents[2].id}
    assert "may run 1 Agents (TenantPolicy tight)" in refused[agents[2].id]


def test_with_policies_an_unselected_namespace_runs_no_agent_and_claims_nothing() -> None:
    tenancy = Tenancy(
        (rule("team-a", namespaces={"matchNames": ["team-a"]}, domains=["*.a.test"]),)
    )
    squatter = AgentClaim(uuid.uuid4(), "mallory", "a0", T0)
    member = AgentClaim(uuid.uuid4(), "team-a", "a0", T0)
    refused = decide_agents([squatter, member], tenancy)
    assert set(refused) == {squatter.id}
    assert "no TenantPolicy selects namespace mallory" in refused[squatter.id]
    assert decide_agents([squatter], Tenancy()) == {}


def test_a_namespace_over_its_agent_quota_cannot_starve_the_others() -> None:
    """254 Agents from one namespace would exhaust the shared pool: with maxAgents its
    youngest are refused, and another namespace's Agent is admitted."""
    tenancy = Tenancy((rule("all", namespaces={"matchLabels": {}}, maxAgents=3),))
    flood = [AgentClaim(uuid.uuid4(), "flood", f"a{i}", T0 + timedelta(seconds=i))
             for i in range(254)]  # fmt: skip
    honest = AgentClaim(uuid.uuid4(), "honest", "web", T0 + timedelta(days=1))
    refused = decide_agents([*flood, honest], tenancy)
    assert len(refused) == 251 and honest.id not in refused
    assert not {a.id for a in flood[:3]} & set(refused)


def test_a_policy_the_operator_cannot_read_grants_nothing_but_still_governs() -> None:
    """A typo must not open the cluster to first-claim-wins."""
    broken, problem = rule_of("typo", {"namespaces": {"matchNames": ["team"]}, "maxAgents": -3})
    assert problem is not None and "spec.maxAgents" in problem
    tenancy = Tenancy((broken,))
    ownership = decide_domains([tunnel("team", domain="a.example.com")], tenancy)
    assert ownership.refusals and not ownership.holders
    assert decide_agents([AgentClaim(uuid.uuid4(), "team", "a", T0)], tenancy)


def test_tenant_policy_validation_names_the_field() -> None:
    with pytest.raises(ValidationError, match="give matchNames, matchLabels or both"):
        TenantPolicySpec.model_validate({"namespaces": {}})
    with pytest.raises(ValidationError, match=r"domains\.0"):
        TenantPolicySpec.model_validate({"namespaces": {"matchNames": ["a"]}, "domains": ["*"]})
    with pytest.raises(ValidationError, match="maxAgents"):
        TenantPolicySpec.model_validate({"namespaces": {"matchNames": ["a"]}, "maxAgents": -1})
    with pytest.raises(ValidationError, match=r"matchNames\.0"):
        TenantPolicySpec.model_validate({"namespaces": {"matchNames": ["Not_A_Namespace"]}})


# --- a claim dates from when its Tunnel could first claim -------------------------------------


def test_an_old_refused_tunnel_that_comes_to_be_allowed_never_jumps_the_queue() -> None:
    """The attacker's namespace (quota 1) has an old Tunnel for the victim's domain waiting
    behind its quota; the victim claims the domain later. The attacker deletes its first
    Tunnel to free its quota: the waiting one claims from that moment, behind the victim."""
    shared = rule("shared", namespaces={"matchNames": ["attacker", "victim"]},
                  domains=["*.apps.example.com"], maxTunnels=1)  # fmt: skip
    tenancy = Tenancy((shared,))
    domain = "shop.apps.example.com"
    decoy = tunnel("attacker", name="decoy", minutes=0, domain="decoy.apps.example.com")
    sleeper = tunnel("attacker", name="sleeper", minutes=1, domain=domain)
    victim = tunnel("victim", name="shop", minutes=10, domain=domain)
    first = decide_domains([decoy, sleeper, victim], tenancy)
    assert first.refusals[sleeper.id].reason == "QuotaExceeded"
    assert first.holders[domain].id == victim.id
    history = ClaimHistory(first.claims, first.unable, now=T0 + timedelta(minutes=30))
    after = decide_domains([sleeper, victim], tenancy, history)
    assert after.holders[domain].id == victim.id
    assert after.refusals[sleeper.id].reason == "DomainConflict"
    assert after.claims[sleeper.id] == T0 + timedelta(minutes=30)
    # Remembered so, the next decision and a restart date it the same.
    later = ClaimHistory(after.claims, after.unable, now=T0 + timedelta(hours=5))
    assert decide_domains([sleeper, victim], tenancy, later).claims == after.claims
    # Only the victim's deletion hands the domain on.
    assert decide_domains([sleeper], tenancy, later).holders[domain].id == sleeper.id


def test_without_history_a_claim_dates_from_its_creation() -> None:
    older, younger = tunnel("a", minutes=0), tunnel("b", minutes=5)
    ownership = decide_domains([younger, older], Tenancy(), ClaimHistory(now=T0 + timedelta(1)))
    assert ownership.claims == {older.id: older.created, younger.id: younger.created}
    assert ownership.unable == frozenset()


def test_a_claim_date_in_status_counts_only_when_the_operator_sealed_it() -> None:
    """Whoever may write a Tunnel's status (it is not always the operator alone) must not be
    able to date a claim back."""
    sealer = Sealer(Sealer.generate_key())
    victim_era = tunnel("attacker", minutes=60)
    since = T0 + timedelta(minutes=90)
    sealed = TunnelStatus.model_validate(
        {"claim": {"since": since.isoformat(), "proof": claim_proof(sealer, victim_era, since)}}
    )
    assert restored_claim(sealer, victim_era, sealed) == since
    forged = sealed.model_copy(update={"claim": sealed.claim.model_copy(  # type: ignore[union-attr]
        update={"since": T0 - timedelta(days=365)})})  # fmt: skip
    assert restored_claim(sealer, victim_era, forged) is None
    other_domain = dataclasses.replace(victim_era, domain="elsewhere.example.com")
    assert restored_claim(sealer, other_domain, sealed) is None
    assert restored_claim(Sealer(Sealer.generate_key()), victim_era, sealed) is None


# --- claims on a port alone (TCPRoute, UDPRoute) ------------------------------------------------


def port_claim(
    namespace: str, port: int = 5432, minutes: int = 0, name: str = "db", **changes: object
) -> TunnelFacts:
    domain = f"tcproute-{port}.{namespace}.kakuremichi.invalid"
    return tunnel(namespace, name=name, minutes=minutes, domain=domain, protocol="TCP",
                  port=port, by_port=True, **changes)  # fmt: skip


def test_no_claim_but_a_port_claim_may_name_a_made_up_name() -> None:
    """A Tunnel (or a route's host) that names a port claim's made-up domain is refused, held
    or not, older or not: whether it is held would tell which namespace holds which port."""
    for others in ([], [port_claim("shop")]):
        probe = tunnel("evil", name="probe", minutes=-60,
                       domain="tcproute-5432.shop.kakuremichi.invalid")  # fmt: skip
        ownership = decide_domains([probe, *others], Tenancy())
        refusal = ownership.refusals[probe.id]
        assert refusal.reason == "DomainNotAllowed"
        assert refusal.message == (
            "spec.domain: names under kakuremichi.invalid are kakuremichi's own (the ports of "
            "TCP and UDP routes go by them)"
        )
        assert all(ownership.serves(claim) for claim in others)


def test_port_claims_of_two_namespaces_the_oldest_holds_and_the_other_learns_nothing() -> None:
    older, younger = port_claim("first", minutes=-5), port_claim("second")
    l4_tunnel = tunnel("third", name="pg", domain="pg.example.com", protocol="TCP", port=5432,
                       minutes=10)  # fmt: skip
    ownership = decide_domains([younger, l4_tunnel, older], Tenancy())
    assert ownership.ports[("TCP", 5432)].id == older.id
    for refused in (younger, l4_tunnel):
        refusal = ownership.refusals[refused.id]
        assert refusal.reason == "PortConflict" and "another namespace" in refusal.message
        assert "first" not in refusal.message
    assert ownership.refusals[younger.id].message.startswith("the listener's port: 5432/TCP")


def test_under_tenant_policies_a_namespace_claims_only_the_ports_its_policies_list() -> None:
    """A policy's ``ports`` are what its namespaces' routes may claim: none unless listed (a
    catch-all quota policy gives no port), and a namespace no policy selects claims none."""
    team = rule("team-a", namespaces={"matchNames": ["team-a"]}, domains=["app.example.com"],
                ports=[{"first": 6000, "last": 6099}])  # fmt: skip
    quota = rule("quota", namespaces={"matchLabels": {}}, maxTunnels=5)
    selected, unlisted = port_claim("team-a", 6000), port_claim("team-a", 7000, name="other")
    quota_only, stranger = port_claim("team-b", 6001), port_claim("team-c", 6002)
    tenancy = Tenancy((team, quota), {"team-a": {}, "team-b": {}})
    ownership = decide_domains([selected, unlisted, quota_only], tenancy)
    assert ownership.serves(selected)
    assert ownership.refusals[unlisted.id].message == (
        "the listener's port: 7000/TCP is not among the ports that namespace team-a may claim "
        "(TenantPolicy quota, team-a: spec.ports)"
    )
    assert ownership.refusals[quota_only.id].reason == "DomainNotAllowed"
    refusal = decide_domains([stranger], Tenancy((team,))).refusals[stranger.id]
    assert refusal.reason == "DomainNotAllowed"
    assert refusal.message == "no TenantPolicy selects namespace team-c, so it may claim no port"
    # A pool that does not open the port: refused as an L4 Tunnel is.
    shut = decide_domains([selected], Tenancy((team,)), ports=PortRules(open={"edge": ()}))
    assert shut.refusals[selected.id].reason == "PortNotAllowed"
