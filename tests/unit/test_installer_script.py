"""The one-line installer's script as a root shell runs it: what a truncated download, a
planted module in the folder it is started from, or a hostile control URL can make of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from kakuremichi.control.installer import install_script, one_liner
from kakuremichi.control.settings import ControlSettings


def test_a_download_cut_short_runs_nothing(tmp_path: Path) -> None:
    script = install_script("agent", "https://control.example:8443")
    assert script.rstrip().endswith('main "$@"')
    marker = tmp_path / "ran"
    for cut in (len(script) // 3, len(script) // 2, len(script) - 20):
        cut_short = script[:cut] + f'\ntouch "{marker}"\n'
        done = subprocess.run(["sh", "-s", "--", "--help"], input=cut_short, text=True,
                              capture_output=True, check=False)  # fmt: skip
        assert done.returncode != 0
        assert not marker.exists()


def test_a_module_planted_where_it_is_started_never_runs(tmp_path: Path) -> None:
    """Python puts the current folder first on its path: a venv.py (or pip, ssl...) left in
    /tmp by a local user would run as root. The script leaves that folder and runs Python
    isolated."""
    planted = tmp_path / "shared"
    planted.mkdir()
    marker = tmp_path / "ROOT_RAN_THIS"
    for module in ("venv", "hashlib", "ssl", "encodings_x"):
        (planted / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    script = planted / "agent.sh"
    script.write_text(install_script("agent", "https://192.0.2.7:9"))  # (nothing answers)
    done = subprocess.run(
        ["sh", str(script), "--api-key=agt_" + "a" * 32, f"--prefix={tmp_path / 'root'}",
         "--no-firewall"],
        cwd=planted, capture_output=True, text=True, check=False, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},  # (no wireguard-go: it stops before pip)
    )  # fmt: skip
    assert done.returncode != 0  # (no WireGuard to get: exit 4, after Python's first look)
    assert not marker.exists(), done.stderr


@pytest.mark.parametrize(
    "url",
    ['https://x/$(id)', 'https://x/a"b', "https://x/`id`", "https://x y", "https://x/;id",
     "https://x/\nid", "https://x/@VERSION@"],
)  # fmt: skip
def test_a_control_url_that_is_not_just_a_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="--control-url"):
        ControlSettings(control_url=url)


def test_the_one_liner_quotes_what_needs_it() -> None:
    assert one_liner("agent", "https://c.example:8443", "agt_x", "/etc/my ca.pem") == (
        "curl -sSL --cacert '/etc/my ca.pem' https://c.example:8443/install/agent.sh | sh -s -- "
        "--api-key=agt_x --control-url=https://c.example:8443 --ca-file='/etc/my ca.pem'"
    )
