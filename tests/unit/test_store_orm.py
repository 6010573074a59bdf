"""Behaviour of the ORM against a migrated database: constraints, cascades, types."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from kakuremichi.control.store import (
    Agent,
    Certificate,
    Gateway,
    Tunnel,
    create_engine_for,
    session_factory,
    upgrade,
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    upgrade(url)
    engine = create_engine_for(url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session


def make_agent(n: int = 1, **overrides: object) -> Agent:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "name": f"agent-{n}",
        "api_key": f"h1:digest-{n}",
        "wireguard_public_key": f"wg-public-key-{n}=",
        "virtual_ip": f"10.{n}.0.100",
        "subnet": f"10.{n}.0.0/24",
    }
    values.update(overrides)
    return Agent(**values)


def make_tunnel(agent_id: uuid.UUID, domain: str = "app.example.com") -> Tunnel:
    return Tunnel(id=uuid.uuid4(), domain=domain, agent_id=agent_id, target="localhost:8080")


def test_agent_with_tunnel_round_trip(session: Session) -> None:
    agent = make_agent(metadata_={"version": "0.1.0", "os": "linux"})
    agent.tunnels.append(Tunnel(id=uuid.uuid4(), domain="app.example.com", target="localhost:8080"))
    session.add(agent)
    session.commit()
    session.expunge_all()

    loaded = session.execute(select(Agent)).scalar_one()
    assert loaded.id == agent.id
    assert isinstance(loaded.id, uuid.UUID)
    assert loaded.status == "offline"
    assert loaded.metadata_ == {"version": "0.1.0", "os": "linux"}
    assert loaded.last_seen_at is None
    [tunnel] = loaded.tunnels
    assert tunnel.domain == "app.example.com"
    assert tunnel.enabled is True
    assert tunnel.agent is loaded


def test_uuid_stored_as_canonical_text(session: Session) -> None:
    agent_id = uuid.UUID("6F1C2A5E-0B7D-4E8A-9C3F-1234567890AB")
    session.add(make_agent(id=agent_id))
    session.commit()
    stored = session.execute(text("SELECT id FROM agents")).scalar_one()
    assert stored == "6f1c2a5e-0b7d-4e8a-9c3f-1234567890ab"
    # A Kubernetes UID given as a string (any case) finds the same row.
    assert session.get(Agent, agent_id) is not None
    found = session.execute(
        select(Agent).where(Agent.id == "6F1C2A5E-0B7D-4E8A-9C3F-1234567890AB")
    ).scalar_one()
    assert found.id == agent_id


def test_timestamps_are_aware_utc(session: Session) -> None:
    seen = datetime(2025, 11, 22, 21, 0, tzinfo=timezone(timedelta(hours=9)))
    session.add(make_agent(last_seen_at=seen))
    session.commit()
    session.expunge_all()

    agent = session.execute(select(Agent)).scalar_one()
    for value in (agent.created_at, agent.updated_at, agent.last_seen_at):
        assert value is not None
        assert value.tzinfo is UTC
    assert agent.last_seen_at == datetime(2025, 11, 22, 12, 0, tzinfo=UTC)

    created, updated = agent.created_at, agent.updated_at
    agent.status = "online"
    session.commit()
    assert agent.created_at == created
    assert agent.updated_at > updated


def test_server_defaults_fill_raw_inserts(session: Session) -> None:
    """Rows written without the ORM still get status/enabled/timestamps, read back aware."""
    session.execute(
        text(
            "INSERT INTO gateways (id, name, api_key, public_ip, wireguard_public_key) "
            "VALUES (:id, 'gateway-tokyo', 'h1:g', '1.2.3.4', 'wg=')"
        ),
        {"id": str(uuid.uuid4())},
    )
    session.commit()
    gateway = session.execute(select(Gateway)).scalar_one()
    assert gateway.status == "offline"
    assert gateway.created_at.tzinfo is UTC
    assert abs(gateway.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_datetime_rejected(session: Session) -> None:
    session.add(make_agent(last_seen_at=datetime(2025, 1, 1)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()


def test_foreign_key_enforced(session: Session) -> None:
    session.add(make_tunnel(uuid.uuid4()))
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        session.commit()


@pytest.mark.parametrize("column", ["api_key", "wireguard_public_key", "virtual_ip", "subnet"])
def test_agent_unique_columns(session: Session, column: str) -> None:
    first = make_agent(1)
    session.add(first)
    session.commit()
    session.add(make_agent(2, **{column: getattr(first, column)}))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        session.commit()


def test_gateway_unique_api_key(session: Session) -> None:
    def gateway(n: int, api_key: str) -> Gateway:
        return Gateway(
            id=uuid.uuid4(),
            name=f"gateway-{n}",
            api_key=api_key,
            public_ip=f"1.2.3.{n}",
            wireguard_public_key=f"wg-{n}=",
        )

    session.add(gateway(1, "h1:same"))
    session.commit()
    session.add(gateway(2, "h1:same"))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        session.commit()


def test_tunnel_domain_unique(session: Session) -> None:
    agent = make_agent()
    session.add(agent)
    session.flush()
    session.add(make_tunnel(agent.id, "app.example.com"))
    session.commit()
    session.add(make_tunnel(agent.id, "app.example.com"))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        session.commit()


def test_certificate_domain_unique(session: Session) -> None:
    def certificate() -> Certificate:
        return Certificate(
            id=uuid.uuid4(),
            domain="app.example.com",
            certificate="-----BEGIN CERTIFICATE-----",
            private_key="s1:sealed",
            expires_at=datetime.now(UTC) + timedelta(days=90),
        )

    session.add(certificate())
    session.commit()
    stored = session.execute(select(Certificate)).scalar_one()
    assert stored.auto_renew is True
    assert stored.expires_at.tzinfo is UTC
    session.add(certificate())
    with pytest.raises(IntegrityError, match="UNIQUE"):
        session.commit()


def test_status_check_rejects_unknown_value(session: Session) -> None:
    session.add(make_agent(status="bogus"))
    with pytest.raises(IntegrityError, match="CHECK constraint failed: ck_agents_status"):
        session.commit()


def test_deleting_agent_cascades_to_tunnels_in_sql(engine: Engine, session: Session) -> None:
    agent = make_agent()
    session.add(agent)
    session.flush()
    session.add_all(
        [make_tunnel(agent.id, "a.example.com"), make_tunnel(agent.id, "b.example.com")]
    )
    session.commit()

    # Plain SQL, so it is the database's ON DELETE CASCADE doing the work, not the ORM.
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM agents WHERE id = :id"), {"id": str(agent.id)})
        assert conn.execute(text("SELECT count(*) FROM tunnels")).scalar_one() == 0


def test_deleting_agent_via_orm_removes_tunnels(session: Session) -> None:
    agent = make_agent()
    agent.tunnels.append(Tunnel(id=uuid.uuid4(), domain="a.example.com", target="h:1"))
    session.add(agent)
    session.commit()
    session.delete(agent)
    session.commit()
    assert session.execute(select(Tunnel)).scalars().all() == []
