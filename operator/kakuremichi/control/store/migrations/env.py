"""Alembic environment for the SQLite mirror.

Normally driven by :func:`kakuremichi.control.store.database.upgrade`, which passes an open
connection in ``config.attributes["connection"]``; falls back to opening one from
``sqlalchemy.url`` so ``alembic.command`` calls with :func:`alembic_config` work too
(for example ``command.revision(alembic_config(url), autogenerate=True, message=...)``).

The whole upgrade runs in one transaction (the engine emits a real BEGIN, so SQLite DDL is
transactional) with foreign keys off, and ``PRAGMA foreign_key_check`` must come back empty
before it commits.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from kakuremichi.control.store.database import create_engine_for
from kakuremichi.control.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _run_on(connection: Connection) -> None:
    with connection.begin():
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
            render_as_batch=True,
            compare_type=True,
            compare_server_default=True,
            transactional_ddl=True,
        )
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                msg = f"migration left foreign key violations: {violations!r}"
                raise RuntimeError(msg)


def run_migrations_offline() -> None:
    """Emit the migration as SQL text (``--sql`` mode) instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        target_metadata=target_metadata,
        render_as_batch=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migration on the caller's connection, or on one opened from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        msg = "no connection in config.attributes and no sqlalchemy.url configured"
        raise RuntimeError(msg)
    engine = create_engine_for(url, foreign_keys=False)
    try:
        with engine.connect() as new_connection:
            _run_on(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
