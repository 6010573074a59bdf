"""The migrated database matches data-model.ja.md, checked with the stdlib sqlite3 module only.

The ORM is deliberately not used for the structural checks: the point is to see what a
reader of the raw file (or another tool) sees.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from kakuremichi.control.store import (
    Base,
    alembic_config,
    create_engine_for,
    current_revision,
    upgrade,
)

# table -> [(column, notnull)] in document order; True where the document marks ✓.
EXPECTED_COLUMNS: dict[str, list[tuple[str, bool]]] = {
    "agents": [
        ("id", True),
        ("name", True),
        ("api_key", True),
        ("wireguard_public_key", True),
        ("virtual_ip", True),
        ("subnet", True),
        ("status", True),
        ("last_seen_at", False),
        ("metadata", False),
        ("created_at", True),
        ("updated_at", True),
    ],
    "gateways": [
        ("id", True),
        ("name", True),
        ("api_key", True),
        ("public_ip", True),
        ("wireguard_public_key", True),
        ("region", False),
        ("status", True),
        ("last_seen_at", False),
        ("metadata", False),
        ("created_at", True),
        ("updated_at", True),
    ],
    "tunnels": [
        ("id", True),
        ("domain", True),
        ("agent_id", True),
        ("target", True),
        ("enabled", True),
        ("description", False),
        ("created_at", True),
        ("updated_at", True),
        # beyond the document (docs/departures.md): TCP, UDP and TLS-passthrough tunnels
        ("protocol", True),
        ("port", False),
    ],
    "certificates": [
        ("id", True),
        ("domain", True),
        ("certificate", True),
        ("private_key", True),
        ("expires_at", True),
        ("auto_renew", True),
        ("last_renewed_at", False),
        ("created_at", True),
        ("updated_at", True),
    ],
}

# index name -> (table, columns, unique)
EXPECTED_INDEXES: dict[str, tuple[str, list[str], bool]] = {
    "uq_agents_api_key": ("agents", ["api_key"], True),
    "uq_agents_wireguard_public_key": ("agents", ["wireguard_public_key"], True),
    "uq_agents_virtual_ip": ("agents", ["virtual_ip"], True),
    "uq_agents_subnet": ("agents", ["subnet"], True),
    "uq_gateways_api_key": ("gateways", ["api_key"], True),
    "uq_gateways_public_ip": ("gateways", ["public_ip"], True),
    "uq_gateways_wireguard_public_key": ("gateways", ["wireguard_public_key"], True),
    "uq_tunnels_domain": ("tunnels", ["domain"], True),
    "ix_tunnels_agent_id": ("tunnels", ["agent_id"], False),
    "uq_certificates_domain": ("certificates", ["domain"], True),
    "ix_certificates_expires_at": ("certificates", ["expires_at"], False),
}

STATUS_CHECK = "CHECK (status IN ('online','offline','error'))"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "k.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db_path)
    try:
        yield conn
    finally:
        conn.close()


def _user_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {name for (name,) in rows}


def _named_indexes(conn: sqlite3.Connection) -> dict[str, tuple[str, list[str], bool]]:
    """Explicitly created indexes (origin 'c'), skipping SQLite's automatic PK indexes."""
    found: dict[str, tuple[str, list[str], bool]] = {}
    for table in EXPECTED_COLUMNS:
        for _seq, name, unique, origin, _partial in conn.execute(f"PRAGMA index_list({table})"):
            if origin != "c":
                continue
            columns = [row[2] for row in conn.execute(f"PRAGMA index_info({name})")]
            found[name] = (table, columns, bool(unique))
    return found


def test_exactly_the_documented_tables(raw: sqlite3.Connection) -> None:
    assert _user_tables(raw) == {*EXPECTED_COLUMNS, "alembic_version"}


@pytest.mark.parametrize("table", list(EXPECTED_COLUMNS))
def test_exactly_the_documented_columns_and_not_null(raw: sqlite3.Connection, table: str) -> None:
    info = raw.execute(f"PRAGMA table_info({table})").fetchall()
    # cid, name, type, notnull, dflt_value, pk
    assert [(row[1], bool(row[3])) for row in info] == EXPECTED_COLUMNS[table]
    assert [row[1] for row in info if row[5]] == ["id"]


def test_column_types_and_lengths(raw: sqlite3.Connection) -> None:
    def types(table: str) -> dict[str, str]:
        return {row[1]: row[2] for row in raw.execute(f"PRAGMA table_info({table})")}

    agents = types("agents")
    assert agents["id"] == "VARCHAR(36)"
    assert agents["name"] == "VARCHAR(64)"
    assert agents["api_key"] == "VARCHAR(64)"
    assert agents["wireguard_public_key"] == "VARCHAR(256)"
    assert agents["virtual_ip"] == "VARCHAR(15)"
    assert agents["subnet"] == "VARCHAR(18)"
    assert agents["status"] == "VARCHAR(16)"
    assert agents["metadata"] == "JSON"
    gateways = types("gateways")
    assert gateways["public_ip"] == "VARCHAR(15)"
    assert gateways["region"] == "VARCHAR(32)"
    tunnels = types("tunnels")
    assert tunnels["domain"] == "VARCHAR(255)"
    assert tunnels["target"] == "VARCHAR(255)"
    assert tunnels["description"] == "TEXT"
    assert tunnels["protocol"] == "VARCHAR(8)"
    assert tunnels["port"] == "INTEGER"
    certificates = types("certificates")
    assert certificates["certificate"] == "TEXT"
    assert certificates["private_key"] == "TEXT"


def test_defaults(raw: sqlite3.Connection) -> None:
    def defaults(table: str) -> dict[str, str | None]:
        return {row[1]: row[4] for row in raw.execute(f"PRAGMA table_info({table})")}

    for table in ("agents", "gateways"):
        assert defaults(table)["status"] == "'offline'"
    assert defaults("tunnels")["enabled"] == "1"
    assert defaults("certificates")["auto_renew"] == "1"
    for table in EXPECTED_COLUMNS:
        assert defaults(table)["created_at"] == "CURRENT_TIMESTAMP"
        assert defaults(table)["updated_at"] == "CURRENT_TIMESTAMP"


def test_indexes(raw: sqlite3.Connection) -> None:
    assert _named_indexes(raw) == EXPECTED_INDEXES


def test_foreign_key(raw: sqlite3.Connection) -> None:
    # id, seq, table, from, to, on_update, on_delete, match
    fks = [row[2:7] for row in raw.execute("PRAGMA foreign_key_list(tunnels)")]
    assert fks == [("agents", "agent_id", "id", "NO ACTION", "CASCADE")]
    for table in ("agents", "gateways", "certificates"):
        assert raw.execute(f"PRAGMA foreign_key_list({table})").fetchall() == []


def test_status_check_constraints(raw: sqlite3.Connection) -> None:
    sql = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert f"CONSTRAINT ck_agents_status {STATUS_CHECK}" in sql["agents"]
    assert f"CONSTRAINT ck_gateways_status {STATUS_CHECK}" in sql["gateways"]
    assert "CHECK" not in sql["tunnels"]
    assert "CHECK" not in sql["certificates"]


def test_journal_mode_is_wal(raw: sqlite3.Connection) -> None:
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_engine_pragmas(db_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(db_path: Path, raw: sqlite3.Connection) -> None:
    before = raw.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    upgrade(f"sqlite:///{db_path}")
    after = raw.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert after == before
    assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]


def test_current_revision(tmp_path: Path, db_path: Path) -> None:
    missing = tmp_path / "missing.db"
    assert current_revision(f"sqlite:///{missing}") is None
    assert not missing.exists(), "asking for the revision must not create the file"
    assert current_revision(f"sqlite:///{db_path}") == "0002"


def test_upgrade_creates_parent_directory_with_relative_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    upgrade("sqlite:///nested/dir/k.db")
    assert (tmp_path / "nested" / "dir" / "k.db").is_file()
    assert current_revision("sqlite:///nested/dir/k.db") == "0002"


def test_orm_and_migration_do_not_drift(db_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_migration_ddl_equals_orm_ddl(tmp_path: Path, raw: sqlite3.Connection) -> None:
    """Stricter than autogenerate: also covers CHECK constraints, FK actions, column order."""
    orm_path = tmp_path / "orm.db"
    engine = create_engine(f"sqlite:///{orm_path}")
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    orm = sqlite3.connect(orm_path)
    try:
        query = "SELECT name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version'"

        def ddl(connection: sqlite3.Connection) -> dict[str, str]:
            # A table rebuilt by a migration (batch mode) is renamed into place, which SQLite
            # records as CREATE TABLE "name": the same table.
            rows = connection.execute(query).fetchall()
            return {
                name: re.sub(r'^CREATE TABLE "(\w+)"', r"CREATE TABLE \1", sql or "")
                for name, sql in rows
            }

        assert ddl(raw) == ddl(orm)
    finally:
        orm.close()


def test_downgrade_to_base_and_back(db_path: Path, raw: sqlite3.Connection) -> None:
    url = f"sqlite:///{db_path}"
    command.downgrade(alembic_config(url), "base")
    assert _user_tables(raw) == {"alembic_version"}
    assert current_revision(url) is None
    upgrade(url)
    assert _user_tables(raw) == {*EXPECTED_COLUMNS, "alembic_version"}


def test_tunnel_rows_of_an_older_release_become_http_tunnels(tmp_path: Path) -> None:
    """Upgrading a mirror written before TCP/UDP/TLS tunnels keeps every row, as HTTP."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    raw = sqlite3.connect(tmp_path / "old.db")
    try:
        raw.execute(
            "INSERT INTO agents (id, name, api_key, wireguard_public_key, virtual_ip, subnet, "
            "status) VALUES ('a', 'home', 'k', 'p', '10.1.0.100', '10.1.0.0/24', 'online')"
        )
        raw.execute(
            "INSERT INTO tunnels (id, domain, agent_id, target) "
            "VALUES ('t', 'app.example.com', 'a', 'localhost:8080')"
        )
        raw.commit()
        upgrade(url)
        assert raw.execute("SELECT domain, protocol, port FROM tunnels").fetchall() == [
            ("app.example.com", "HTTP", None)
        ]
    finally:
        raw.close()
