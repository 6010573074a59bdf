"""hack/demo.py (``make demo``): the pure pieces: running the operator's containers the way the
kubelet would, and the command it prints."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from kakuremichi.api.resources import GatewaySpec
from kakuremichi.control.manifests import (
    POD_TOKEN_MOUNT,
    EdgeImage,
    agent_sidecar,
    gateway_daemonset,
)

REPO = Path(__file__).resolve().parents[2]


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kakuremichi_demo", REPO / "hack" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
EDGE = EdgeImage(image="edge:test", control_url="https://control.example:8443")


def test_gateway_daemonset_args_run_with_the_folder_and_the_node_name(tmp_path: Path) -> None:
    daemonset = gateway_daemonset(
        "demo", "uid-1", GatewaySpec(), EDGE, "kakuremichi-demo", "pool-secret"
    )
    pod_spec = daemonset["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    mounts = {"/etc/kakuremichi": tmp_path / "creds", "/var/lib/kakuremichi": tmp_path / "state"}
    args = demo.edge_command(container["args"], mounts, {"NODE_NAME": "node-a"})
    assert args[0] == "gateway"
    assert args[args.index("--api-key-file") + 1] == str(tmp_path / "creds" / "apiKey")
    assert args[args.index("--node-name") + 1] == "node-a"
    assert args[args.index("--control-url") + 1] == "https://control.example:8443"
    assert args[args.index("--state-dir") + 1] == str(tmp_path / "state")
    assert not any("$(" in arg or arg.startswith(tuple(mounts)) for arg in args)
    with_token = demo.edge_command(
        container["args"], {**mounts, POD_TOKEN_MOUNT: tmp_path / "token"}, {}
    )
    assert with_token[with_token.index("--pod-token-file") + 1] == str(tmp_path / "token" / "token")
    secret = demo.secret_volume_name(pod_spec, "/etc/kakuremichi", container["name"])
    assert secret == "pool-secret"


def test_sidecar_args_and_its_secret(tmp_path: Path) -> None:
    sidecar = agent_sidecar("agent-creds", EDGE)
    pod_spec = {
        "containers": [{"name": "web"}, sidecar.container],
        "volumes": sidecar.volumes,
    }
    args = demo.edge_command(sidecar.container["args"], {"/etc/kakuremichi": tmp_path}, {})
    assert args[args.index("--private-key-file") + 1] == str(tmp_path / "wireguardPrivateKey")
    name = demo.secret_volume_name(pod_spec, "/etc/kakuremichi", sidecar.container["name"])
    assert name == "agent-creds"


def test_only_the_mount_point_itself_is_remapped(tmp_path: Path) -> None:
    args = ["--x", "/etc/kakuremichi-other/file", "/etc/kakuremichi", "a$(MISSING)b"]
    assert demo.edge_command(args, {"/etc/kakuremichi": tmp_path}, {}) == [
        "--x",
        "/etc/kakuremichi-other/file",
        str(tmp_path),
        "a$(MISSING)b",
    ]


def test_printed_command_starts_with_curl_and_pins_the_gateway(tmp_path: Path) -> None:
    line = shlex.join(demo.curl_command(tmp_path / "ca.pem"))
    assert line.startswith("curl ")
    assert f"--cacert {tmp_path / 'ca.pem'}" in line
    assert f"--resolve {demo.DOMAIN}:443:{demo.GATEWAY_IP}" in line
    assert line.endswith(f"https://{demo.DOMAIN}/")


def test_hosts_file_maps_control() -> None:
    assert demo.hosts_file({"control.kakuremichi.test": "192.168.239.1"}) == (
        "127.0.0.1 localhost\n192.168.239.1 control.kakuremichi.test\n"
    )


def test_demo_subnets_stay_clear_of_the_tests() -> None:
    """The tests link namespaces on 192.168.240-253.0/24 and name them kmt-*."""
    thirds = {int(subnet.split(".")[2]) for subnet in demo.SUBNETS}
    assert thirds.isdisjoint(range(240, 254))
    assert all(not name.startswith("kmt-") for name in demo.NETWORK_NAMESPACES)


def _pod(name: str, node: str = "", pinned: str = "", deleting: bool = False) -> dict[str, object]:
    spec: dict[str, object] = {"nodeName": node} if node else {}
    if pinned:
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [pinned]}]}
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [term]}}}  # fmt: skip
    meta: dict[str, object] = {"name": name, **({"deletionTimestamp": "now"} if deleting else {})}
    return {"metadata": meta, "spec": spec}


def test_the_daemonsets_pod_for_the_node_is_found_bound_or_not() -> None:
    pods = {"items": [_pod("a", pinned="other"), _pod("old", pinned="node-a", deleting=True),
                      _pod("b", pinned="node-a")]}  # fmt: skip
    assert demo.daemon_pod_for(pods, "node-a")["metadata"]["name"] == "b"
    assert demo.daemon_pod_for({"items": [_pod("c", node="node-a")]}, "node-a") is not None
    assert demo.daemon_pod_for({"items": [_pod("c", node="other")]}, "node-a") is None
    assert demo.daemon_pod_for(None, "node-a") is None


def test_added_hosts_subnets_are_their_own() -> None:
    """Each added host's two links stay clear of the demo's, the tests' and each other's."""
    taken = {int(subnet.split(".")[2]) for subnet in demo.SUBNETS} | set(range(240, 254))
    for number in range(1, demo.MAX_HOSTS + 1):
        thirds = {int(subnet.split(".")[2]) for subnet in demo.host_subnets(number)}
        assert len(thirds) == 2 and thirds.isdisjoint(taken)
        taken |= thirds


def test_added_host_names_fit_an_edges_interface_and_a_namespace() -> None:
    """A host's name becomes its WireGuard interface (km + 1-13 characters) and its links."""
    for name in ("a", "laptop", "second2", "abcdefgh"):
        assert demo.HOST_NAME.match(name)
        interface = demo.host_interface(name)
        assert interface.startswith("km") and len(interface) <= 15
        assert len(f"{demo.HOST_ROOT_LINK_PREFIX}{name}") <= 15  # IFNAMSIZ
    for name in ("", "Laptop", "1host", "abcdefghi", "a-b", "a/../b", "a b"):
        assert not demo.HOST_NAME.match(name)


def test_the_added_host_sees_no_wireguard_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new machine has none of the demo's wireguard-go: the installer must fetch control's."""
    with_it, without = tmp_path / "with", tmp_path / "without"
    with_it.mkdir()
    without.mkdir()
    (with_it / "wireguard-go").write_text("")
    monkeypatch.setenv("PATH", f"{with_it}:{without}:/usr/bin")
    assert demo.without_wireguard_go() == f"{without}:/usr/bin"
