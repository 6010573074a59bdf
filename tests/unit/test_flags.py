"""The operator's options are defined once, on its settings: the command line, the settings it
runs with, its errors and the README's table all come from there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kakuremichi.cli import build_parser, main
from kakuremichi.control.flags import flagged, markdown_table, values_from
from kakuremichi.control.settings import LETS_ENCRYPT, ControlSettings

KAKUREMICHI = str(Path(sys.executable).parent / "kakuremichi")
README = Path(__file__).resolve().parents[2] / "README.md"


def settings(*args: str) -> ControlSettings:
    parsed = build_parser().parse_args(["operator", *args])
    return ControlSettings(**values_from(parsed, ControlSettings))


def test_the_readme_table_is_the_settings_own() -> None:
    text = README.read_text()
    found = re.search(r"<!-- operator flags:[^\n]*-->\n(.*?)<!-- end of operator flags -->", text,
                      re.S)  # fmt: skip
    assert found is not None
    expected = markdown_table(ControlSettings)
    assert found.group(1) == expected, f"README.md's operator flags should read:\n{expected}"


def test_no_flag_given_is_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for item in flagged(ControlSettings):
        if item.flag.env:
            monkeypatch.delenv(item.flag.env, raising=False)
    assert settings() == ControlSettings()
    assert settings().acme_directory == LETS_ENCRYPT


def test_every_kind_of_flag_reaches_its_setting(tmp_path: Path) -> None:
    made = settings(
        "--db", "sqlite:////data/km.db", "--trust-loopback", "--heartbeat-timeout", "12.5",
        "--namespace", "a", "--namespace", "b", "--exclude-cidr", "10.96.0.0/12",
        "--subnet-pool", "1-3", "--webhook-cert-dir", str(tmp_path), "--max-unauthenticated", "9",
    )  # fmt: skip
    assert made.db_url == "sqlite:////data/km.db"
    assert made.trust_loopback is True
    assert made.heartbeat_timeout == 12.5
    assert made.namespaces == ("a", "b")
    assert made.subnet_excluded == ("10.96.0.0/12",)
    assert (made.subnet_pool().first, made.subnet_pool().last) == (1, 3)
    assert made.webhook_cert_dir == tmp_path
    assert made.max_unauthenticated == 9


def test_environment_defaults_and_the_flag_over_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "kakuremichi-system")
    monkeypatch.setenv("KAKUREMICHI_ACME_EAB_HMAC_KEY", "c2VjcmV0")
    assert settings().system_namespace == "kakuremichi-system"
    assert settings().acme_eab_hmac_key == "c2VjcmV0"
    assert settings("--system-namespace", "other").system_namespace == "other"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-unauthenticated", "0"], "--max-unauthenticated: Input should be greater than"),
        (["--heartbeat-timeout", "-1"], "--heartbeat-timeout: Input should be greater than 0"),
        (["--subnet-pool", "1-2-3"], "--subnet-pool: String should match"),
        (["--subnet-pool", "9-3"], "--subnet-pool/--subnet-third-octets/--exclude-cidr: "),
        (["--control-tls-cert", "/x.pem"], "--control-tls-cert and --control-tls-key go together"),
        (["--namespace", "a", "--all-namespaces"], "exclude each other"),
    ],
)
def test_bad_values_are_refused_by_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["operator", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_shows_defaults_and_environment_variables() -> None:
    text = subprocess.run(
        [KAKUREMICHI, "operator", "--help"], capture_output=True, text=True, check=True,
        env={**os.environ, "COLUMNS": "1000"},  # (one line per option)
    ).stdout  # fmt: skip
    assert "(default: 127.0.0.1:8480)" in text
    assert "(or KAKUREMICHI_SUBNET_THIRD_OCTETS)" in text
    assert "ACME (Tunnels and Certificates with issuer ACME)" in text
