"""Engines, sessions and migrations for the SQLite mirror.

SQLite needs a few per-connection settings to behave like the database the schema assumes:

* ``PRAGMA foreign_keys=ON`` - off by default in SQLite, and without it
  ``tunnels.agent_id`` and its ON DELETE CASCADE are decorative.
* ``PRAGMA journal_mode=WAL`` - readers do not block the writer (the API and the reconcilers
  read while one of them writes); the setting is persistent in the file.
* ``PRAGMA synchronous=NORMAL`` - in WAL mode a commit no longer waits for an fsync (the WAL
  is synced at checkpoints): a crash of the process loses nothing, a power loss at most the last
  commits, and the file stays consistent. The mirror is derivable from the cluster, and
  otherwise every reconciled object's row waits for a disk sync.
* ``PRAGMA busy_timeout`` - wait for a competing writer instead of failing at once with
  "database is locked".
* Transaction control is taken over from the ``sqlite3`` driver, which in its legacy mode
  never emits BEGIN before DDL or SELECT. SQLAlchemy emits ``BEGIN`` itself, so migrations
  are atomic (a failed upgrade leaves the previous schema intact) and SAVEPOINTs nest
  properly. This is the recipe in SQLAlchemy's SQLite dialect documentation.

Migrations run with foreign keys *off*: SQLite batch migrations rebuild a table by copying it
and dropping the original, and with enforcement on, that DROP would cascade-delete the
children. Integrity is then checked with ``PRAGMA foreign_key_check`` before the migration
transaction commits (see ``migrations/env.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS_DIR",
    "alembic_config",
    "create_engine_for",
    "current_revision",
    "session_factory",
    "upgrade",
]

BUSY_TIMEOUT_MS: Final = 5000
"""How long a connection waits on a locked database before raising."""

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
"""Alembic script location; shipped inside the package, so no alembic.ini is needed."""


def _sqlite_file(url: URL) -> Path | None:
    """Return the database file of a SQLite URL, or None for memory/URI databases."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def create_engine_for(url: str, *, foreign_keys: bool = True) -> Engine:
    """Create an engine; for SQLite, apply the connection settings described in the module.

    ``foreign_keys=False`` is for the migration runner only. Accepts ``sqlite:///relative``
    (relative to the working directory) and ``sqlite:////absolute`` URLs; other backends are
    passed through unchanged.
    """
    sa_url = make_url(url)
    engine = create_engine(sa_url)
    if sa_url.get_backend_name() != "sqlite":
        return engine

    fk_setting = "ON" if foreign_keys else "OFF"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Driver-level autocommit, so the PRAGMAs below run outside any transaction (they
        # are silently ignored inside one) and BEGIN is left to the "begin" hook.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys = {fk_setting}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine``.

    ``expire_on_commit=False``: rows are handed to reconcilers and API serializers after the
    transaction ends, and reloading them lazily there would open surprise transactions.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Build the Alembic configuration in code (script location inside the package)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal '%' (URL-escaped characters) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``, creating the file and its directory.

    Idempotent: upgrading a database that is already at ``revision`` does nothing.
    """
    database_file = _sqlite_file(make_url(url))
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine_for(url, foreign_keys=False)
    try:
        with engine.connect() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """Return the Alembic revision the database is at, or None if it was never migrated.

    A missing SQLite file is reported as None without creating it.
    """
    sa_url = make_url(url)
    database_file = _sqlite_file(sa_url)
    if database_file is not None and not database_file.exists():
        return None
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
