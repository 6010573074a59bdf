"""The last config an edge applied, kept on disk (``--state-dir``) so that an edge restarted while
control is away serves it at once instead of nothing.

The file holds private keys (the WireGuard key control sent, the gateway's TLS keys): it is
written mode 0600, replaced atomically, and bound to the control URL and API key the edge starts
with (and a pool gateway's node), so a state directory reused by another edge, or pointed at
another control, is never served from. When control refuses the edge's key (its Agent or
Gateway was deleted) the file is removed: a revoked edge does not come back to life at its next
start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kakuremichi.api import protocol

log = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=protocol.AgentConfig | protocol.GatewayConfig)


class SavedConfig(BaseModel, Generic[ConfigT]):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    owner: str
    """Whose config this is: :func:`owner_fingerprint` of control, key and node."""
    saved_at: datetime
    config: ConfigT


def owner_fingerprint(control_url: str, api_key: str, node_name: str | None = None) -> str:
    """A digest naming the edge (its control, its starting key and, for a gateway pool's pod,
    its node) without revealing the key."""
    parts = ("kakuremichi saved config", control_url, api_key, node_name or "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class ConfigFile(Generic[ConfigT]):
    """``<state dir>/<role>-config.json``: save after each applied config, load at start."""

    def __init__(
        self,
        state_dir: Path,
        role: str,
        kind: type[ConfigT],
        control_url: str,
        api_key: str,
        node_name: str | None = None,
    ) -> None:
        self.path = state_dir / f"{role}-config.json"
        self.model: type[SavedConfig[ConfigT]] = SavedConfig[kind]  # type: ignore[valid-type]
        self.owner = owner_fingerprint(control_url, api_key, node_name)

    def load(self) -> SavedConfig[ConfigT] | None:
        """The saved config, or None (no file yet, or one that is not ours: logged)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("cannot read the saved config %s: %s", self.path, error.strerror)
            return None
        try:
            saved = self.model.model_validate_json(text)
        except ValidationError as error:
            log.warning(
                "ignoring the saved config %s: not a config this version can read (%s)",
                self.path,
                error.errors()[0]["msg"] if error.errors() else error,
            )
            return None
        if saved.owner != self.owner:
            log.warning(
                "ignoring the saved config %s: it was saved for another control URL, API key or "
                "node",
                self.path,
            )
            return None
        return saved

    def save(self, config: ConfigT) -> None:
        """Write ``config`` whole or not at all (a crash mid-write leaves the previous file)."""
        saved = self.model(owner=self.owner, saved_at=datetime.now(UTC), config=config)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "w") as out:
                out.write(saved.model_dump_json(by_alias=True, exclude_none=True))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    def set_aside(self) -> None:
        """Keep a file that broke the edge for a look, out of the way of the next start."""
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_name(f"{self.path.name}.bad"))

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            log.warning("removed the saved config %s", self.path)
