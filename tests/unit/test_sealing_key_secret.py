"""Where the sealing key lives with ``--sealing-key-secret``: in the Secret, made once (from an
older release's key file when there is one, which then leaves the data volume)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kakuremichi.control.main import SEALING_KEY, SealingKeyConflict, load_sealer
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.store import Sealer


class Kube:
    def __init__(self, secrets: dict[str, dict[str, str]] | None = None) -> None:
        self.secrets = secrets or {}

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(f"{namespace}/{name}")

    async def create_secret(
        self, namespace: str, name: str, data: Mapping[str, str], owner: Any, labels: Any
    ) -> bool:
        assert owner is None  # nobody owns it: it outlives whatever made it
        if f"{namespace}/{name}" in self.secrets:
            return False
        self.secrets[f"{namespace}/{name}"] = dict(data)
        return True


def settings(tmp_path: Path) -> ControlSettings:
    return ControlSettings(
        db_url=f"sqlite:///{tmp_path / 'kakuremichi.db'}", system_namespace="kakuremichi",
        sealing_key_secret="kakuremichi-sealing-key",
    )  # fmt: skip


def load(tmp_path: Path, kube: Kube) -> Sealer:
    return asyncio.run(load_sealer(settings(tmp_path), kube))  # type: ignore[arg-type]


def key_text() -> str:
    return base64.b64encode(Sealer.generate_key()).decode()


def test_a_new_install_makes_the_secret_and_writes_nothing_to_the_data_volume(
    tmp_path: Path,
) -> None:
    kube = Kube()
    sealer = load(tmp_path, kube)
    stored = kube.secrets["kakuremichi/kakuremichi-sealing-key"][SEALING_KEY]
    assert sealer.digest_api_key("agt_x") == Sealer.from_key_text(stored).digest_api_key("agt_x")
    assert list(tmp_path.iterdir()) == []
    assert load(tmp_path, kube).digest_api_key("agt_x") == sealer.digest_api_key("agt_x")


def test_an_older_releases_key_file_moves_into_the_secret(tmp_path: Path) -> None:
    legacy = key_text()
    (tmp_path / SEALING_KEY).write_text(legacy + "\n")
    kube = Kube()
    sealer = load(tmp_path, kube)
    assert kube.secrets["kakuremichi/kakuremichi-sealing-key"][SEALING_KEY] == legacy
    assert not (tmp_path / SEALING_KEY).exists()
    assert sealer.digest_api_key("agt_x") == Sealer.from_key_text(legacy).digest_api_key("agt_x")


def test_two_different_keys_refuse_to_start_and_touch_nothing(tmp_path: Path) -> None:
    (tmp_path / SEALING_KEY).write_text(key_text())
    kube = Kube({"kakuremichi/kakuremichi-sealing-key": {SEALING_KEY: key_text()}})
    with pytest.raises(SealingKeyConflict, match="hold different sealing keys"):
        load(tmp_path, kube)
    assert (tmp_path / SEALING_KEY).exists()
