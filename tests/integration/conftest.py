"""Fixtures that start real components: network namespaces, WireGuard, the local API server,
Pebble. Each is torn down after use, and a test that needs something this machine lacks skips
with the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.infra import binaries, cluster, netns, pebble, wireguard


@pytest.fixture(scope="session")
def namespaces_supported() -> None:
    reason = netns.can_create_namespaces()
    if reason:
        pytest.skip(reason)
    netns.sweep_stale()


@pytest.fixture
def make_host(namespaces_supported: None) -> Iterator[netns.HostFactory]:
    created: list[netns.Host] = []

    def factory(role: str) -> netns.Host:
        host = netns.Host(role)
        created.append(host)
        return host

    yield factory
    for host in reversed(created):
        host.destroy()


@pytest.fixture(scope="session")
def wireguard_mode(namespaces_supported: None) -> wireguard.Mode:
    mode, why = wireguard.available_mode()
    if mode is None:
        pytest.skip(why)
    return mode


@pytest.fixture(scope="session")
def kernel_wireguard(namespaces_supported: None) -> None:
    reason = wireguard.kernel_wireguard_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def pebble_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pebble.Pebble]:
    """Pebble and pebble-challtestsrv; point names at a host with ``add_a``."""
    reason = binaries.missing("pebble", "pebble-challtestsrv")
    if reason:
        pytest.skip(reason)
    server = pebble.start(tmp_path_factory.mktemp("pebble"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """The API server: our own local control plane, or an existing cluster when opted in."""
    reason = cluster.unavailable()
    if reason:
        pytest.skip(reason)
    started = cluster.start(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
def namespace(kube: cluster.Cluster) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = cluster.unique_name("kmt")
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
