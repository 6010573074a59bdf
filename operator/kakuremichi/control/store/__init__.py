"""SQLite mirror of the data model: schema, migrations, engines and secret sealing.

The database is derived from the cluster (rows are keyed by Kubernetes object UIDs) and
keeps no secret in a usable form: API keys as keyed digests, private keys sealed with a
master key that lives outside the file.
"""

from kakuremichi.control.store.database import (
    alembic_config,
    create_engine_for,
    current_revision,
    session_factory,
    upgrade,
)
from kakuremichi.control.store.schema import (
    STATUS_VALUES,
    Agent,
    Base,
    Certificate,
    Gateway,
    Tunnel,
    utcnow,
)
from kakuremichi.control.store.sealing import KEY_SIZE, Sealer, SealingError

__all__ = [
    "KEY_SIZE",
    "STATUS_VALUES",
    "Agent",
    "Base",
    "Certificate",
    "Gateway",
    "Sealer",
    "SealingError",
    "Tunnel",
    "alembic_config",
    "create_engine_for",
    "current_revision",
    "session_factory",
    "upgrade",
    "utcnow",
]
