"""Where the test suite finds the binaries hack/build-binaries.sh builds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-binaries.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("KAKUREMICHI_CACHE", Path.home() / ".cache" / "kakuremichi"))


def current_dir() -> Path:
    """bin/current: the links hack/build-binaries.sh keeps to the pinned binaries."""
    return cache_dir() / "bin" / "current"


def put_first_on_path() -> None:
    """Put bin/current first on PATH, for the tests and every process they start: the edges and
    the test hosts run the wireguard-go built there (the current release), not Debian's older
    one. Nothing changes when it has not been built yet."""
    folder = current_dir()
    if not folder.is_dir():
        return
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(folder)]
    os.environ["PATH"] = os.pathsep.join([str(folder), *rest])


def find(name: str) -> Path | None:
    """The binary ``name``: KUBEBUILDER_ASSETS first (envtest convention), then the folder
    hack/build-binaries.sh fills, then PATH."""
    candidates = []
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(assets) / name)
    candidates.append(current_dir() / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def missing(*names: str) -> str | None:
    """None when all binaries are present, otherwise a reason naming what to run."""
    absent = [name for name in names if find(name) is None]
    if not absent:
        return None
    return f"missing {', '.join(absent)}: run hack/build-binaries.sh {' '.join(absent)}"
