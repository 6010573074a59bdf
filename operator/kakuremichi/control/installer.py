"""The one-line installer for hosts outside the cluster: the script control serves at
``/install/<role>.sh``, the command that runs it, and what control serves beside it (the edge
kit): the kakuremichi wheel of its release, a wheelhouse with it and every dependency (so a
host needs no package index: air-gapped hosts too), and wireguard-go builds for hosts whose
kernel has no WireGuard, their SHA-256 written into the script, which checks them.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from kakuremichi import __version__
from kakuremichi.api.protocol import EXIT_NO_WIREGUARD, NO_WIREGUARD

IMAGE_WHEEL_DIR = Path("/usr/share/kakuremichi")
"""Where the image keeps the wheel it was built from (edge-image/Dockerfile)."""
WHEEL_NAME = re.compile(r"^kakuremichi-(?P<version>[^-/]+)-py3-none-any\.whl$")
ROUTE_PREFIX = "/install/"
IMAGE_WHEELHOUSE = IMAGE_WHEEL_DIR / "wheels"
"""The image's wheelhouse: this release's wheel and its dependencies for the platforms the
image supports (edge-image/Dockerfile)."""
WIREGUARD_GO_ARCHES = ("amd64", "arm64")
WIREGUARD_GO_NAME = "wireguard-go-linux-{arch}"
"""The image keeps its wireguard-go builds as /usr/share/kakuremichi/wireguard-go-linux-ARCH."""


@dataclass(frozen=True)
class EdgeKit:
    """What control serves the installer besides the script."""

    wheel: Path | None = None
    wheelhouse: Path | None = None
    wireguard_go: Mapping[str, tuple[Path, str]] = field(default_factory=dict)
    """Architecture (``amd64``, ``arm64``) → the build and its SHA-256."""

    @classmethod
    def load(
        cls, wheel: Path | None, wheelhouse: Path | None, wireguard_go: Path | None
    ) -> EdgeKit:
        """From the files (hashed once: they do not change under a running operator)."""
        builds = {}
        for arch in WIREGUARD_GO_ARCHES:
            candidate = (wireguard_go or Path("/nonexistent")) / WIREGUARD_GO_NAME.format(arch=arch)
            if candidate.is_file():
                builds[arch] = (candidate, hashlib.sha256(candidate.read_bytes()).hexdigest())
        return cls(wheel, wheelhouse if wheelhouse and wheelhouse.is_dir() else None, builds)

    def wheelhouse_files(self) -> list[str]:
        """The wheelhouse's wheels, listed once (it does not change under a running operator,
        and a request must not make the loop read a folder)."""
        return list(self._wheelhouse_files)

    @cached_property
    def _wheelhouse_files(self) -> tuple[str, ...]:
        if self.wheelhouse is None:
            return ()
        return tuple(sorted(p.name for p in self.wheelhouse.iterdir() if p.name.endswith(".whl")))


def default_wheelhouse(directory: Path = IMAGE_WHEELHOUSE) -> Path | None:
    """The image's wheelhouse, when this runs from the image and it holds this release."""
    return directory if (directory / release_wheel_name()).is_file() else None


def default_wireguard_go(directory: Path = IMAGE_WHEEL_DIR) -> Path | None:
    """The image's wireguard-go builds, when this runs from the image."""
    names = [WIREGUARD_GO_NAME.format(arch=arch) for arch in WIREGUARD_GO_ARCHES]
    return directory if any((directory / name).is_file() for name in names) else None


class EdgeWheelError(ValueError):
    pass


def release_wheel_name(version: str = __version__) -> str:
    return f"kakuremichi-{version}-py3-none-any.whl"


def default_edge_wheel(directory: Path = IMAGE_WHEEL_DIR) -> Path | None:
    """The image's own wheel, when this runs from the image."""
    candidate = directory / release_wheel_name()
    return candidate if candidate.is_file() else None


def check_edge_wheel(path: Path) -> Path:
    """``path`` if it is a wheel of this very release, else :class:`EdgeWheelError` saying why."""
    match = WHEEL_NAME.match(path.name)
    if match is None:
        raise EdgeWheelError(f"{path}: not a kakuremichi wheel ({release_wheel_name('VERSION')})")
    if match["version"] != __version__:
        raise EdgeWheelError(
            f"{path}: release {match['version']}, but this operator is {__version__} "
            "(edges must run the operator's release)"
        )
    if not path.is_file():
        raise EdgeWheelError(f"{path}: no such file")
    return path


def install_script(role: str, control_url: str, kit: EdgeKit | None = None) -> str:
    """The installer with control's URL and what control serves (wheel, wheelhouse,
    wireguard-go builds and their hashes) filled in."""
    kit = kit or EdgeKit()
    template = resources.files("kakuremichi.control").joinpath("install.sh").read_text()
    builds = " ".join(f"{arch}:{digest}" for arch, (_, digest) in sorted(kit.wireguard_go.items()))
    return (
        template.replace("@ROLE@", role)
        .replace("@CONTROL_URL@", control_url)
        .replace("@VERSION@", __version__)
        .replace("@SERVED_WHEEL@", kit.wheel.name if kit.wheel else "")
        .replace("@WHEELHOUSE@", "1" if kit.wheelhouse else "")
        .replace("@WIREGUARD_GO@", builds)
        .replace("@NO_WIREGUARD@", NO_WIREGUARD.replace("'", "'\\''"))
        .replace("@EXIT_NO_WIREGUARD@", str(EXIT_NO_WIREGUARD))
    )


def plain_http_warning(control_url: str) -> str | None:
    """Why an http:// control URL will not do for a host elsewhere, or None."""
    parsed = urlsplit(control_url)
    if parsed.scheme != "http" or (parsed.hostname or "") in ("localhost", "127.0.0.1", "::1"):
        return None
    return (
        f"{control_url} is plain HTTP: control sends an edge its WireGuard private key (and a "
        "gateway its certificates) only over TLS, so the installed edge would get no key; use "
        "the https:// URL of the control channel"
    )


def one_liner(role: str, control_url: str, api_key: str, ca_file: str | None = None) -> str:
    """The command that installs an edge, as the data-model document shows it (with
    ``ca_file``, a path on the host, for a control URL signed by a private CA). Every value is
    quoted for the shell where it needs it (the one-liner runs as root)."""
    script = shlex.quote(f"{control_url}{ROUTE_PREFIX}{role}.sh")
    args = f"--api-key={shlex.quote(api_key)} --control-url={shlex.quote(control_url)}"
    if ca_file is None:
        return f"curl -sSL {script} | sh -s -- {args}"
    ca = shlex.quote(ca_file)
    return f"curl -sSL --cacert {ca} {script} | sh -s -- {args} --ca-file={ca}"
