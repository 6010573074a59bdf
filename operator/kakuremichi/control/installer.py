"""The one-line installer for hosts outside the cluster: the script control serves at
``/install/<role>.sh``, the command that runs it, and the kakuremichi wheel control serves beside
it, so that a host installs exactly the operator's release (edges speak control's wire protocol)
without a package index that has it.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from kakuremichi import __version__

IMAGE_WHEEL_DIR = Path("/usr/share/kakuremichi")
"""Where the image keeps the wheel it was built from (edge-image/Dockerfile)."""
WHEEL_NAME = re.compile(r"^kakuremichi-(?P<version>[^-/]+)-py3-none-any\.whl$")
ROUTE_PREFIX = "/install/"


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


def install_script(role: str, control_url: str, served_wheel: str | None) -> str:
    """The installer with control's URL and the name of the wheel it serves (if any) filled in."""
    template = resources.files("kakuremichi.control").joinpath("install.sh").read_text()
    return (
        template.replace("@ROLE@", role)
        .replace("@CONTROL_URL@", control_url)
        .replace("@SERVED_WHEEL@", served_wheel or "")
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
    ``ca_file``, a path on the host, for a control URL signed by a private CA)."""
    if ca_file is None:
        return (
            f"curl -sSL {control_url}{ROUTE_PREFIX}{role}.sh | sh -s -- "
            f"--api-key={api_key} --control-url={control_url}"
        )
    ca = shlex.quote(ca_file)
    return (
        f"curl -sSL --cacert {ca} {control_url}{ROUTE_PREFIX}{role}.sh | sh -s -- "
        f"--api-key={api_key} --control-url={control_url} --ca-file={ca}"
    )
