"""The one-line installer: served by control with its URL filled in, printed by
``kakuremichi agent-command``, and installing an edge from a wheel into a root of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kakuremichi import __version__
from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, GATEWAY
from tests.infra import binaries, netns, ports
from tests.infra.binaries import REPO
from tests.infra.cluster import Cluster, unique_name
from tests.infra.fixtures import OperatorProcess, local_operator
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA

KAKUREMICHI = str(Path(sys.executable).parent / "kakuremichi")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
    )
    (built,) = out.glob("kakuremichi-*.whl")
    return built


@pytest.fixture(scope="module")
def operator(
    kube: Cluster, operator_namespace: str, wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator serving this checkout's wheel to the installer, as the image's serves its
    own (``--edge-wheel``)."""
    workdir = tmp_path_factory.mktemp("operator")
    running = local_operator(kube, operator_namespace, workdir, "--edge-wheel", str(wheel))
    running.start()
    yield running
    running.stop()


def served_script(operator: OperatorProcess, role: str = "agent") -> str:
    with urllib.request.urlopen(
        f"{operator.control_url}/install/{role}.sh", timeout=10
    ) as response:
        return str(response.read().decode())


def run_script(
    script: Path, *args: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run it the way the one-liner does: the script on standard input, ``sh -s -- ARGS``."""
    command = ["sh", "-s", "--", *args]
    if user:
        command = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *command]
    return subprocess.run(
        command, input=script.read_text(), capture_output=True, text=True, check=False,
        timeout=600, cwd="/",
    )  # fmt: skip


def test_one_liner_installs_an_agent_into_a_root_of_its_own(
    kube: Cluster, operator: OperatorProcess, wheel: Path, tmp_path: Path
) -> None:
    agents = Objects(kube, operator.namespace, AGENT)
    agents.create("outside")
    status = agents.ready("outside")
    api_key = (Secrets(kube, operator.namespace).read(status["credentialsSecret"]) or {})["apiKey"]
    printed = subprocess.run(
        [KAKUREMICHI, "agent-command", "outside", "-n", operator.namespace,
         "--control-url", operator.control_url],
        capture_output=True, text=True, check=True,
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
    ).stdout.strip()  # fmt: skip
    assert printed == (
        f"curl -sSL {operator.control_url}/install/agent.sh | sh -s -- "
        f"--api-key={api_key} --control-url={operator.control_url}"
    )
    text = served_script(operator)
    assert 'ROLE="agent"' in text and f'CONTROL_URL="{operator.control_url}"' in text
    script = tmp_path / "agent.sh"
    script.write_text(text)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True)

    # By default the host installs control's own release, fetched from control (here trusting
    # a private CA as well); a second run, from a wheel given by hand, updates in place.
    root = tmp_path / "root"
    ca_file = tmp_path / "private-ca.pem"
    ca_file.write_text(TestCA().pem)
    first = run_script(script, f"--api-key={api_key}", f"--prefix={root}", f"--ca-file={ca_file}")
    assert first.returncode == 0, first.stderr
    assert f"downloading {operator.control_url}/install/{wheel.name}" in first.stdout
    conf = root / "etc" / "kakuremichi" / "agent.conf"
    assert "KAKUREMICHI_CA_FILE=/etc/kakuremichi/control-ca.pem" in conf.read_text()
    assert (conf.parent / "control-ca.pem").read_text() == ca_file.read_text()
    second = run_script(script, f"--api-key={api_key}", f"--prefix={root}", f"--wheel={wheel}")
    assert second.returncode == 0, second.stderr
    assert "downloading" not in second.stdout
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert f"KAKUREMICHI_API_KEY={api_key}" in conf.read_text()
    assert f"KAKUREMICHI_CONTROL_URL={operator.control_url}" in conf.read_text()
    assert "KAKUREMICHI_CA_FILE" not in conf.read_text()
    unit = (root / "etc" / "systemd" / "system" / "kakuremichi-agent.service").read_text()
    assert (
        "ExecStart=/opt/kakuremichi/venv/bin/kakuremichi agent --state-dir /var/lib/kakuremichi"
        in unit
    )
    assert "StateDirectory=kakuremichi\nStateDirectoryMode=0700" in unit
    assert "EnvironmentFile=/etc/kakuremichi/agent.conf" in unit
    installed = root / "opt" / "kakuremichi" / "venv" / "bin" / "kakuremichi"
    assert subprocess.run([str(installed), "--version"], capture_output=True, text=True,
                          check=True).stdout.strip() == f"kakuremichi {__version__}"  # fmt: skip
    agents.delete_all()


def test_over_a_private_ca_the_installer_needs_and_keeps_it(
    kube: Cluster, wheel: Path, tmp_path: Path
) -> None:
    """Control on TLS with a certificate of a private CA: without --ca-file the wheel cannot be
    fetched and the script says what to add; with it, the wheel comes over verified TLS and the
    service is given the CA."""
    namespace = unique_name("kmtlsinst")
    kube.kubectl("create", "namespace", namespace)
    (tmp_path / "operator").mkdir()
    tls_operator = local_operator(
        kube, namespace, tmp_path / "operator", "--edge-wheel", str(wheel), tls=TestCA()
    )
    tls_operator.start()
    try:
        url = tls_operator.control_url
        context = ssl.create_default_context(cafile=str(tls_operator.ca_file))
        with urllib.request.urlopen(f"{url}/install/agent.sh", context=context) as response:
            script = tmp_path / "agent.sh"
            script.write_bytes(response.read())
        api_key = "agt_" + "a" * 43
        untrusted = run_script(script, f"--api-key={api_key}", f"--prefix={tmp_path / 'a'}")
        assert untrusted.returncode != 0
        assert "for a private CA, add --ca-file=PATH" in untrusted.stderr
        root = tmp_path / "b"
        trusted = run_script(script, f"--api-key={api_key}", f"--prefix={root}",
                             f"--ca-file={tls_operator.ca_file}")  # fmt: skip
        assert trusted.returncode == 0, trusted.stderr
        assert f"downloading {url}/install/{wheel.name}" in trusted.stdout
        conf = (root / "etc" / "kakuremichi" / "agent.conf").read_text()
        assert f"KAKUREMICHI_CONTROL_URL={url}" in conf
        assert "KAKUREMICHI_CA_FILE=/etc/kakuremichi/control-ca.pem" in conf
    finally:
        tls_operator.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def install_command(kube: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KAKUREMICHI, *args], capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
    )  # fmt: skip


def test_gateway_command_prints_the_one_liner_of_an_external_gateway_only(
    kube: Cluster, operator: OperatorProcess
) -> None:
    gateways = Objects(kube, operator.namespace, GATEWAY)
    external, pool = unique_name("kmout"), unique_name("kmpool")
    url, system = operator.control_url, ("--system-namespace", operator.namespace)
    try:
        gateways.create(external, {"mode": "External", "publicIP": "203.0.113.77"})
        status = gateways.ready(external)
        secret = Secrets(kube, operator.namespace).read(status["credentialsSecret"]) or {}
        done = install_command(kube, "gateway-command", external, *system, "--control-url", url,
                               "--ca-file", "/etc/ssl/my ca.pem")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"curl -sSL --cacert '/etc/ssl/my ca.pem' {url}/install/gateway.sh | sh -s -- "
            f"--api-key={secret['apiKey']} --control-url={url} --ca-file='/etc/ssl/my ca.pem'"
        )
        gateways.create(pool, {"mode": "InCluster"})
        refused = install_command(kube, "gateway-command", pool, *system, "--control-url", url)
        assert refused.returncode == 1
        assert f"Gateway {pool} is InCluster" in refused.stderr and "gtw_" not in refused.stdout
        missing = install_command(kube, "gateway-command", "nope", *system, "--control-url", url)
        assert (missing.returncode, missing.stderr.strip()) == (1, "Gateway nope does not exist")
    finally:
        gateways.delete_all()


def test_control_serves_its_own_wheel_and_nothing_else(
    operator: OperatorProcess, wheel: Path
) -> None:
    assert f'SERVED_WHEEL="{wheel.name}"' in served_script(operator, "gateway")
    url = f"{operator.control_url}/install/{wheel.name}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == wheel.read_bytes()
    for other in ("kakuremichi-0.0.1-py3-none-any.whl", "kakuremichi-..%2F..%2Fetc%2Fpasswd.whl"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{operator.control_url}/install/{other}", timeout=10)
        assert refused.value.code == 404


@pytest.mark.parametrize(
    ("args", "user", "message"),
    [
        (["--api-key=agt_" + "a" * 32], "65534", "run as root"),
        (["--api-key=agt_" + "a" * 32], None, "systemd is not running"),
        ([], None, "--api-key=KEY is required"),
        (["--api-key=hunter2"], None, "does not look like a kakuremichi API key"),
        (["--api-key=agt_" + "a" * 32, "--control-url=ftp://x"], None, "http:// or https://"),
        (
            ["--api-key=agt_" + "a" * 32, "--control-url=http://192.0.2.7:8480"],
            None,
            "is plain HTTP: anyone on the way could change what this installs as root",
        ),
    ],
    ids=["not-root", "no-systemd", "no-key", "bad-key", "bad-url", "plain-http"],
)
def test_installer_refuses_clearly(
    operator: OperatorProcess, tmp_path: Path, args: list[str], user: str | None, message: str
) -> None:
    if message == "systemd is not running" and Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd")
    script = tmp_path / "agent.sh"
    script.write_text(served_script(operator))
    script.chmod(0o755)
    result = run_script(script, *args, user=user)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (Path("/etc/kakuremichi/agent.conf").exists() and user)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel and every dependency's, as the image keeps them."""
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(out), str(REPO)], check=True
    )
    return out


def without_wireguard_go() -> str:
    """This PATH without the folders that hold a wireguard-go."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if not (Path(f) / "wireguard-go").exists())


@dataclass
class BareHost:
    host: netns.Host
    operator: OperatorProcess
    ca_file: Path
    workdir: Path

    def agent_key(self, kube: Cluster, name: str) -> str:
        agents = Objects(kube, self.operator.namespace, AGENT)
        agents.create(name)
        status = agents.ready(name)
        secrets = Secrets(kube, self.operator.namespace)
        return str((secrets.read(status["credentialsSecret"]) or {})["apiKey"])


@contextlib.contextmanager
def bare_host(
    kube: Cluster, make_host: netns.HostFactory, workdir: Path, *operator_args: str
) -> Iterator[BareHost]:
    """A host in a network namespace of its own that reaches control (on TLS, at its address
    on the host's link) and nothing else: no package index, and no WireGuard on its PATH."""
    host = make_host("bare")
    root_side, _ = netns.link_root(host, "192.168.241.0")
    address = str(root_side.ip)
    namespace = unique_name("kmbare")
    kube.kubectl("create", "namespace", namespace)
    ca = TestCA()
    serving = ca.issue(address)
    (workdir / "tls.crt").write_text(serving.certificate_pem)
    (workdir / "tls.key").write_text(serving.private_key_pem)
    ca_file = workdir / "ca.pem"
    ca_file.write_text(ca.pem)
    url = f"https://{address}:{ports.free_port()}"
    operator = OperatorProcess(
        kube=kube, namespace=namespace, db_path=workdir / "k.db",
        log_path=workdir / "operator.log", control_url=url, ca_file=ca_file,
        args=["--db", f"sqlite:///{workdir / 'k.db'}", "--namespace", namespace,
              "--system-namespace", namespace, "--control-listen", url.removeprefix("https://"),
              "--control-url", url, "--control-tls-cert", str(workdir / "tls.crt"),
              "--control-tls-key", str(workdir / "tls.key"), "--heartbeat-timeout", "5",
              "--webhook-listen", "", *operator_args],
    )  # fmt: skip
    operator.start()
    try:
        yield BareHost(host, operator, ca_file, workdir)
    finally:
        operator.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def one_liner(kube: Cluster, bare: BareHost, name: str) -> str:
    """What ``kakuremichi agent-command`` prints for the Agent."""
    return subprocess.run(
        [KAKUREMICHI, "agent-command", name, "-n", bare.operator.namespace,
         "--control-url", bare.operator.control_url, "--ca-file", str(bare.ca_file)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
    ).stdout.strip()  # fmt: skip


def test_a_host_without_wireguard_or_an_index_gets_both_from_control_and_its_agent_comes_up(
    kube: Cluster, make_host: netns.HostFactory, wheel: Path, wheelhouse: Path, tmp_path: Path
) -> None:
    built = binaries.find("wireguard-go")
    assert built is not None
    served = tmp_path / "wireguard-go"
    served.mkdir()
    shutil.copy2(built, served / "wireguard-go-linux-amd64")
    with bare_host(kube, make_host, tmp_path, "--edge-wheel", str(wheel),
                   "--edge-wheelhouse", str(wheelhouse),
                   "--edge-wireguard-go", str(served)) as bare:  # fmt: skip
        key = bare.agent_key(kube, "bare")
        root = tmp_path / "root"
        # The one-liner, verbatim, with --prefix (no systemd in a namespace).
        command = f"{one_liner(kube, bare, 'bare')} --prefix={root}"
        path = without_wireguard_go()
        done = subprocess.run(
            bare.host.command("env", f"PATH={path}", "sh", "-c", command),
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "installing the control plane's wireguard-go (amd64)" in done.stdout
        assert f"installing from {bare.operator.control_url}/install/wheels/" in done.stdout
        installed = root / "opt" / "kakuremichi" / "bin" / "wireguard-go"
        assert installed.read_bytes() == built.read_bytes()
        # The agent, as the unit would run it: it finds the wireguard-go beside it.
        log = tmp_path / "agent.log"
        agent = bare.host.spawn(
            [str(root / "opt" / "kakuremichi" / "venv" / "bin" / "kakuremichi"), "agent",
             "--control-url", bare.operator.control_url, "--api-key", key,
             "--ca-file", str(bare.ca_file), "--state-dir", str(tmp_path / "state"),
             "--wireguard-interface", "kmbare0"],
            log=log, env={"PATH": path},
        )  # fmt: skip
        try:
            agents = Objects(kube, bare.operator.namespace, AGENT)
            wait_until(
                lambda: (agents.get("bare") or {}).get("status", {}).get("state") == "online",
                "the installed agent to come up", timeout=60,
            )  # fmt: skip
            assert "userspace wireguard-go" in log.read_text()
        finally:
            agent.terminate()
            agent.wait(timeout=20)


def test_with_no_wireguard_to_get_installer_and_agent_say_so_in_one_line(
    kube: Cluster, make_host: netns.HostFactory, wheel: Path, tmp_path: Path
) -> None:
    with bare_host(kube, make_host, tmp_path, "--edge-wheel", str(wheel)) as bare:
        key = bare.agent_key(kube, "nowg")
        path = without_wireguard_go()
        command = f"{one_liner(kube, bare, 'nowg')} --prefix={tmp_path / 'root'}"
        done = subprocess.run(
            bare.host.command("env", f"PATH={path}", "sh", "-c", command),
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert done.returncode == protocol.EXIT_NO_WIREGUARD, done.stdout + done.stderr
        line = f"kakuremichi agent: {protocol.NO_WIREGUARD}"
        assert done.stderr.strip().splitlines()[-1] == line
        assert not (tmp_path / "root" / "opt" / "kakuremichi" / "venv").exists()
        # The agent command alone, on that host, says the same and exits the same way.
        alone = subprocess.run(
            bare.host.command(
                "env", f"PATH={path}", KAKUREMICHI, "agent", "--control-url",
                bare.operator.control_url, "--api-key", key, "--ca-file", str(bare.ca_file),
                "--wireguard-interface", "kmnowg0",
            ),
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert alone.returncode == protocol.EXIT_NO_WIREGUARD, alone.stderr
        assert line in alone.stderr.splitlines()


def test_a_wheelhouse_that_fails_is_not_replaced_by_the_package_index_unasked(
    kube: Cluster, make_host: netns.HostFactory, wheel: Path, tmp_path: Path
) -> None:
    """A wheelhouse without the dependencies (as a network attacker could make it look by
    breaking its downloads) ends the install with the way out named, instead of pip taking
    what is missing from whatever index it is pointed at."""
    built = binaries.find("wireguard-go")
    assert built is not None
    served = tmp_path / "wireguard-go"
    served.mkdir()
    shutil.copy2(built, served / "wireguard-go-linux-amd64")
    incomplete = tmp_path / "wheelhouse"
    incomplete.mkdir()
    shutil.copy2(wheel, incomplete / wheel.name)
    with bare_host(kube, make_host, tmp_path, "--edge-wheel", str(wheel),
                   "--edge-wheelhouse", str(incomplete),
                   "--edge-wireguard-go", str(served)) as bare:  # fmt: skip
        bare.agent_key(kube, "partial")
        root = tmp_path / "root"
        command = f"{one_liner(kube, bare, 'partial')} --prefix={root}"
        done = subprocess.run(
            bare.host.command("env", f"PATH={without_wireguard_go()}", "sh", "-c", command),
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Rerun with --allow-index" in done.stderr
        assert "trying the package index" not in done.stderr
        assert not (root / "opt" / "kakuremichi" / "venv" / "bin" / "kakuremichi").exists()
