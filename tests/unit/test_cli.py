"""The ``kakuremichi`` command as a user runs it."""

from __future__ import annotations

import base64
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kakuremichi.api.fields import SENTENCES
from kakuremichi.cli import build_parser, main
from kakuremichi.control.flags import values_from
from kakuremichi.control.installer import install_script, plain_http_warning, release_wheel_name
from kakuremichi.control.settings import ControlSettings

REPO = Path(__file__).resolve().parents[2]


def test_console_script_runs_as_a_program() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kakuremichi", "--help"], capture_output=True, text=True, check=True
    )
    assert "crds" in result.stdout and "db" in result.stdout


def test_crds_check_passes_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--check", str(REPO / "crds")]) == 0


def test_crds_check_fails_on_a_stale_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["crds", "--check", str(tmp_path)]) == 1
    assert "kakuremichi crds --output-dir" in capsys.readouterr().err
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert main(["crds", "--check", str(tmp_path)]) == 0


def test_crds_print_all_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    out = capsys.readouterr().out
    for name in ("agents", "gateways", "tunnels", "certificates"):
        assert f"name: {name}.kakuremichi.io" in out


def test_db_upgrade_creates_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nested" / "k.db"
    assert main(["db", "upgrade", "--db", f"sqlite:///{path}"]) == 0
    assert "at revision" in capsys.readouterr().out
    tables = {
        row[0]
        for row in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type='table'"
        )
    }
    assert {"agents", "gateways", "tunnels", "certificates"} <= tables
    assert main(["db", "current", "--db", f"sqlite:///{path}"]) == 0


def test_db_new_key_writes_a_private_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "seal.key"
    assert main(["db", "new-key", "--output", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text())) == 32
    assert main(["db", "new-key", "--output", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_validate_reports_each_problem_with_its_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "tunnel.yaml"
    manifest.write_text(
        """
apiVersion: kakuremichi.io/v1alpha1
kind: Tunnel
metadata: {name: app}
spec: {domain: app.example.com, agent: home, target: "localhost:8080"}
---
apiVersion: kakuremichi.io/v1alpha1
kind: Tunnel
metadata: {name: broken}
spec: {domain: "app.example.com.", agent: home, target: "localhost:0"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"""
    )
    assert main(["validate", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "#1 Tunnel/app: valid" in captured.out
    # The sentence first (the same the API server answers with), then the detail.
    assert (
        f"#2 Tunnel/broken: spec.domain: {SENTENCES['DomainName']} ('app.example.com.' must not "
        "end with a dot)" in captured.err
    )
    assert (
        f"#2 Tunnel/broken: spec.target: {SENTENCES['TargetAddress']} ('localhost:0': port must be "
        "between 1 and 65535, got 0)" in captured.err
    )
    assert "ConfigMap" not in captured.out + captured.err


def test_edges_refuse_to_start_without_a_key_or_with_a_bad_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KAKUREMICHI_API_KEY", raising=False)
    monkeypatch.delenv("KAKUREMICHI_CONTROL_URL", raising=False)
    assert main(["agent", "--control-url", "https://control.example.com"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main(["gateway", "--api-key", "gtw_x", "--control-url", "control:8480"]) == 2
    assert "--control-url: must be an http:// or https:// URL" in (capsys.readouterr().err)
    bad_key = tmp_path / "key"
    bad_key.write_text("short")
    code = main(["agent", "--api-key", "agt_x", "--control-url", "http://c",
                 "--private-key-file", str(bad_key)])  # fmt: skip
    assert code == 2
    assert "not a WireGuard key" in capsys.readouterr().err
    for workers in ("0", "many"):
        monkeypatch.setenv("KAKUREMICHI_WORKERS", workers)
        assert main(["gateway", "--api-key", "gtw_x", "--control-url", "http://c"]) == 2
        assert "--workers: " in capsys.readouterr().err


def test_operator_refuses_a_bad_webhook_service_or_a_missing_edge_ca(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["operator", "--webhook-service", "kakuremichi/webhook"]) == 2
    assert "--webhook-service: expected NAMESPACE/NAME:PORT" in capsys.readouterr().err
    assert main(["operator", "--edge-ca-file", str(tmp_path / "missing.pem")]) == 2
    assert "--edge-ca-file" in capsys.readouterr().err


def test_operator_serves_only_a_wheel_of_its_own_release(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    older = tmp_path / "kakuremichi-0.0.1-py3-none-any.whl"
    older.write_bytes(b"PK")
    assert main(["operator", "--edge-wheel", str(older)]) == 2
    assert f"--edge-wheel {older}: release 0.0.1, but this operator is" in capsys.readouterr().err
    assert main(["operator", "--edge-wheel", str(tmp_path / "agent.tar.gz")]) == 2
    assert "not a kakuremichi wheel" in capsys.readouterr().err
    assert main(["operator", "--edge-wheel", str(tmp_path / release_wheel_name())]) == 2
    assert "no such file" in capsys.readouterr().err


def test_without_a_served_wheel_the_installer_uses_the_package_index() -> None:
    script = install_script("agent", "https://control.example.com")
    assert 'SERVED_WHEEL=""' in script
    assert not re.search(r"@[A-Z_]+@", script), "every placeholder filled in"


def test_operator_subnet_third_octets_from_flag_or_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["operator", "--subnet-third-octets", "0"]) == 2
    assert "third octets must be 1-256" in capsys.readouterr().err
    monkeypatch.setenv("KAKUREMICHI_SUBNET_THIRD_OCTETS", "4")
    assert operator_settings().subnet_third_octets == 4
    assert operator_settings("--subnet-third-octets", "2").subnet_third_octets == 2
    monkeypatch.delenv("KAKUREMICHI_SUBNET_THIRD_OCTETS")
    assert operator_settings().subnet_third_octets == 1


def operator_settings(*args: str) -> ControlSettings:
    """What ``kakuremichi operator ARGS`` would run with."""
    parsed = build_parser().parse_args(["operator", *args])
    return ControlSettings(**values_from(parsed, ControlSettings))


def test_a_plain_http_control_url_is_fine_on_loopback_only() -> None:
    assert plain_http_warning("http://127.0.0.1:8480") is None
    assert plain_http_warning("https://control.example.com") is None
    warning = plain_http_warning("http://control.example.com")
    assert warning is not None and "only over TLS" in warning and "https://" in warning


def test_an_edge_without_nft_says_so_in_one_line_and_exits_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nft on it
    monkeypatch.delenv("KAKUREMICHI_NO_FIREWALL", raising=False)
    code = main(["agent", "--control-url", "http://127.0.0.1:1", "--api-key", "agt_x",
                 "--metrics-listen", ""])  # fmt: skip
    assert code == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "nft is not installed" in line and "--no-firewall" in line


def test_an_edge_without_wireguard_says_so_in_one_line_and_exits_4(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No kernel module asked for and no wireguard-go: one line, an exit status the installed
    unit does not restart on (RestartPreventExitStatus), not a traceback."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no wireguard-go on it
    code = main(["agent", "--control-url", "http://127.0.0.1:1", "--api-key", "agt_x",
                 "--metrics-listen", "", "--no-firewall",
                 "--wireguard-mode", "userspace"])  # fmt: skip
    assert code == 4
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "wireguard-go is not installed" in line and "modprobe wireguard" in line
