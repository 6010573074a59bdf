#!/usr/bin/env python3
"""``make demo``: kakuremichi end to end on one Linux machine, as root, without Docker.

    .venv/bin/python hack/demo.py up|down|status|add-host NAME

``up`` builds, in this order (everything it makes is named kmdemo-* or lives in .demo/):

1. a local Kubernetes control plane: ``hack/cluster.sh up`` (etcd, kube-apiserver and
   kube-controller-manager on loopback, the CRDs installed, kubeconfig in .cluster/kubeconfig);
2. two network namespaces standing in for two machines, joined by veth links::

     root namespace (you, the      kmdemo-gateway               kmdemo-agent
     API server, the operator)     (a public node)              (behind NAT, beside the origin)
     kmdemo-gw 192.168.239.1 ───── to-root 192.168.239.2
                                   to-agent 192.168.238.1 ───── to-gateway 192.168.238.2
     kmdemo-ag 192.168.237.1 ────────────────────────────────── to-root 192.168.237.2

3. ``kakuremichi operator`` in the root namespace, its control channel on TLS at
   https://control.kakuremichi.test:PORT (192.168.239.1, a certificate from the demo CA in
   .demo/ca.pem; both namespaces resolve the name through /etc/netns/<namespace>/hosts);
4. a Node (there is no kubelet) whose ExternalIP 192.168.238.1 is the gateway's WireGuard
   endpoint, and a Gateway pool on it; the demo binds the DaemonSet's pod to the Node (as the
   scheduler would) and mints its pod-bound token (as the kubelet would), and the gateway runs
   in kmdemo-gateway with the arguments, the API key and the token of that pod, as the kubelet
   would run it (plus a WireGuard interface name of the demo's own);
5. an Agent, and a Pod labelled ``kakuremichi.io/agent: demo`` into which the operator's webhook
   injects the agent sidecar; the agent runs in kmdemo-agent with the sidecar's arguments and
   credentials, beside the demo origin (hack/demo_origin.py on 127.0.0.1:8080);
6. a Tunnel publishing demo.kakuremichi.test with a certificate from the demo CA;
7. the cluster agent: the operator watches every namespace and serves Ingresses and HTTPRoutes
   through the Agent ``demo`` (``--cluster-agent``), which may reach a second origin on
   192.168.237.2:8090 in kmdemo-agent (``--endpoint-range 192.168.237.2/32``); the IngressClass
   and GatewayClass ``kakuremichi``, a namespace ``demo-apps`` with a Gateway API Gateway and
   the demo CA's certificates for ingress.kakuremichi.test and route.kakuremichi.test, and
   files to apply: .demo/ingress.yaml, .demo/httproute.yaml and .demo/tcproute.yaml (each a
   Service without selector, an EndpointSlice naming that origin, and an Ingress, an HTTPRoute
   or a TCPRoute on the Gateway's TCP listener, port 18090);

then waits for the first HTTPS answer through the gateway and prints the curl command that gets
it. ``add-host NAME`` then brings in another machine the way the Add-Agent flow has it: a
namespace kmdemo-h-NAME with no package index and no WireGuard runs the one-liner that
``kakuremichi agent-command`` prints, which installs the operator's wheelhouse and wireguard-go
from control (``up`` builds both into .demo/). ``down`` removes all of it, the cluster and the
added hosts included. ``up`` and ``down`` are idempotent: ``up`` on a running demo first takes it
down.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kakuremichi.api.protocol import POD_TOKEN_AUDIENCE
from kakuremichi.control.manifests import (
    AGENT_LABEL,
    CREDENTIALS_MOUNT,
    GATEWAY_LABEL,
    POD_TOKEN_MOUNT,
    SIDECAR_NAME,
    STATE_MOUNT,
    gateway_daemonset_name,
)

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".demo"
CLUSTER_DIR = REPO / ".cluster"
KUBECONFIG = CLUSTER_DIR / "kubeconfig"
CLUSTER_SCRIPT = REPO / "hack" / "cluster.sh"
BUILD_SCRIPT = REPO / "hack" / "build-binaries.sh"
ORIGIN_SCRIPT = REPO / "hack" / "demo_origin.py"
KAKUREMICHI = Path(sys.executable).parent / "kakuremichi"
PROCESSES_FILE = STATE / "processes.json"

NAMESPACE = "kakuremichi-demo"  # Kubernetes namespace of the demo's objects
DOMAIN = "demo.kakuremichi.test"
CONTROL_NAME = "control.kakuremichi.test"
NODE = "kmdemo-node"
NODE_LABEL = "kakuremichi-demo"
CERT_NAME = "demo-tls"  # the kubernetes.io/tls Secret the Tunnel serves
PASSTHROUGH_DOMAIN = "vault.kakuremichi.test"  # what the README's TLS Tunnel publishes
ORIGIN_TLS_PORT = 8443

# Network namespaces, and the root ends of their links (deleting a namespace deletes its links).
GATEWAY_NS = "kmdemo-gateway"
AGENT_NS = "kmdemo-agent"
NETWORK_NAMESPACES = (GATEWAY_NS, AGENT_NS)
GATEWAY_ROOT_LINK = "kmdemo-gw"
AGENT_ROOT_LINK = "kmdemo-ag"
ROOT_LINKS = (GATEWAY_ROOT_LINK, AGENT_ROOT_LINK)
CONTROL_IP = "192.168.239.1"  # root end of the gateway's link: control listens here
GATEWAY_IP = "192.168.239.2"  # the gateway, as you reach it from the root namespace
PUBLIC_IP = "192.168.238.1"  # the gateway facing the agent: the Node's ExternalIP
AGENT_PUBLIC_IP = "192.168.238.2"
AGENT_ROOT_IP = "192.168.237.1"
AGENT_IP = "192.168.237.2"
SUBNETS = ("192.168.237.0/24", "192.168.238.0/24", "192.168.239.0/24")
PREFERRED_CONTROL_PORT = 8443
ORIGIN_PORT = 8080
ROUTE_TCP_PORT = 18090  # the Gateway API Gateway's TCP listener (in the pool's tunnelPorts)
ROUTES_ORIGIN_PORT = 8090  # on AGENT_IP: what the cluster agent reaches for Ingresses, HTTPRoutes
APPS_NAMESPACE = "demo-apps"
INGRESS_DOMAIN = "ingress.kakuremichi.test"
ROUTE_DOMAIN = "route.kakuremichi.test"
# wireguard-go keeps its UAPI socket in /var/run/wireguard/<interface>.sock, one folder for all
# namespaces: names of our own keep the demo clear of other edges on this machine (the tests').
WIREGUARD_UAPI_DIR = Path("/var/run/wireguard")
WIREGUARD_INTERFACES = {"gateway": "kmdemo-wg-gw", "agent": "kmdemo-wg-ag"}

# Started processes, in the order `down` stops them (hosts added later go first).
PROCESS_NAMES = ("routes-origin", "origin", "agent", "gateway", "operator")
# Hosts added with `add-host NAME`: namespace kmdemo-h-NAME, links to the root (control) and to
# the gateway's namespace (its public address), subnets by the host's number.
HOST_NS_PREFIX = "kmdemo-h-"
HOST_ROOT_LINK_PREFIX = "kmdh-"
HOSTS_FILE = STATE / "hosts.json"
MAX_HOSTS = 9

# Debian package of each command the demo runs (`make deps` installs them). wireguard-go is not
# one: hack/build-binaries.sh builds the current release (use_built_binaries).
TOOLS = {
    "ip": "iproute2",
    "curl": "curl",
    "openssl": "openssl",
    "setsid": "util-linux",
}

# --- what a user would apply -----------------------------------------------------------------

NODE_YAML = f"""\
apiVersion: v1
kind: Node
metadata:
  name: {NODE}
  labels:
    {NODE_LABEL}: "true"
"""

GATEWAY_YAML = f"""\
apiVersion: kakuremichi.io/v1alpha1
kind: Gateway
metadata:
  name: demo
spec:
  mode: InCluster
  nodeSelector:
    {NODE_LABEL}: "true"
  # The ports TCP and UDP Tunnels may have (none unless the admin says: they are the node's)
  tunnelPorts:
    - {{first: 10000, last: 19999}}
"""


CLASSES_YAML = """\
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: kakuremichi
spec:
  controller: kakuremichi.io/ingress-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: kakuremichi
spec:
  controllerName: kakuremichi.io/gateway-controller
"""

ROUTED_GATEWAY_YAML = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: demo
  namespace: {APPS_NAMESPACE}
spec:
  gatewayClassName: kakuremichi
  listeners:
  - name: https
    protocol: HTTPS
    port: 443
    hostname: "*.kakuremichi.test"
    tls:
      certificateRefs:
      - name: route-tls
  - name: tcp
    protocol: TCP
    port: {ROUTE_TCP_PORT}
"""


def backend_yaml(name: str) -> str:
    """A Service without selector and the EndpointSlice that names the demo's second origin."""
    return f"""\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {APPS_NAMESPACE}
spec:
  ports:
  - name: http
    port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {APPS_NAMESPACE}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  port: {ROUTES_ORIGIN_PORT}
endpoints:
- addresses: ["{AGENT_IP}"]
"""


INGRESS_YAML = (
    backend_yaml("web")
    + f"""\
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: {APPS_NAMESPACE}
spec:
  ingressClassName: kakuremichi
  tls:
  - hosts: [{INGRESS_DOMAIN}]
    secretName: ingress-tls
  rules:
  - host: {INGRESS_DOMAIN}
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: web
            port:
              number: 80
"""
)

HTTPROUTE_YAML = (
    backend_yaml("site")
    + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: site
  namespace: {APPS_NAMESPACE}
spec:
  parentRefs:
  - name: demo
  hostnames: [{ROUTE_DOMAIN}]
  rules:
  - backendRefs:
    - name: site
      port: 80
"""
)


TCPROUTE_YAML = (
    backend_yaml("plain")
    + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata:
  name: plain
  namespace: {APPS_NAMESPACE}
spec:
  parentRefs:
  - name: demo
    sectionName: tcp
  rules:
  - backendRefs:
    - name: plain
      port: 80
"""
)


POD_YAML = f"""\
apiVersion: v1
kind: Pod
metadata:
  name: demo-origin
  namespace: {NAMESPACE}
  labels:
    {AGENT_LABEL}: demo
spec:
  containers:
  - name: origin
    image: demo-origin
"""


def tunnel_yaml(name: str, domain: str, agent: str, secret: str) -> str:
    return f"""\
apiVersion: kakuremichi.io/v1alpha1
kind: Tunnel
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  domain: {domain}
  agent: {agent}
  target: localhost:{ORIGIN_PORT}
  tls:
    issuer: Secret
    secretName: {secret}
"""


def agent_yaml(name: str, display_name: str | None = None) -> str:
    return f"""\
apiVersion: kakuremichi.io/v1alpha1
kind: Agent
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  displayName: {display_name or f"demo host {name}"}
"""


TUNNEL_YAML = tunnel_yaml("demo", DOMAIN, "demo", CERT_NAME)
AGENT_YAML = agent_yaml("demo", "kakuremichi demo")

T = TypeVar("T")


class DemoError(Exception):
    """A failure to report in a sentence (and maybe a log tail), without a traceback."""


# --- pure helpers ------------------------------------------------------------------------------


def edge_command(
    args: Sequence[str], mounts: Mapping[str, Path], env: Mapping[str, str]
) -> list[str]:
    """A container's arguments as the kubelet would run them with its volumes at the folders
    of ``mounts`` (mount point → folder): ``$(VAR)`` references expanded from ``env``, the
    mount points moved."""
    out = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        for mount, folder in mounts.items():
            if arg == mount or arg.startswith(f"{mount}/"):
                arg = str(folder) + arg[len(mount) :]
        out.append(arg)
    return out


def daemon_pod_for(pods: Mapping[str, Any] | None, node: str) -> dict[str, Any] | None:
    """Of a pod listing, the live DaemonSet pod for ``node`` (bound to it already, or pinned
    to it by the node affinity the DaemonSet controller sets)."""
    for pod in (pods or {}).get("items", []):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        spec = pod.get("spec") or {}
        if spec.get("nodeName"):
            if spec["nodeName"] == node:
                return dict(pod)
            continue
        affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
        required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
        for term in required.get("nodeSelectorTerms") or []:
            for field in term.get("matchFields") or []:
                if field.get("key") == "metadata.name" and node in (field.get("values") or []):
                    return dict(pod)
    return None


def curl_command(ca_file: Path, domain: str = DOMAIN) -> list[str]:
    """What a user runs to reach the demo: from the root namespace, straight to the gateway."""
    return [
        "curl",
        "--cacert",
        str(ca_file),
        "--resolve",
        f"{domain}:443:{GATEWAY_IP}",
        f"https://{domain}/",
    ]


def hosts_file(entries: Mapping[str, str]) -> str:
    """/etc/hosts text: ``ip netns exec`` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts."""
    lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ip in entries.items()]
    return "\n".join(lines) + "\n"


def secret_volume_name(pod_spec: Mapping[str, Any], mount_path: str, container: str) -> str:
    """The Secret behind the volume ``container`` mounts at ``mount_path``."""
    (spec,) = [c for c in pod_spec["containers"] if c["name"] == container]
    (mount,) = [m for m in spec.get("volumeMounts", []) if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    name: str = volume["secret"]["secretName"]
    return name


# --- commands and processes --------------------------------------------------------------------


def say(message: str) -> None:
    print(message, flush=True)


def step(message: str) -> None:
    say(f"==> {message}")


def run(
    *args: str,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    timeout: float = 120,
) -> str:
    """Run a command; its stdout, or DemoError with its stderr when it fails and ``check``."""
    try:
        result = subprocess.run(  # noqa: S603 - our own commands, no shell
            list(args),
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            env=None if env is None else {**os.environ, **env},
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        if check:
            raise DemoError(f"{shlex.join(args)}: {error}") from None
        return ""
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise DemoError(f"{shlex.join(args)} failed ({result.returncode}):\n{detail}")
    return result.stdout


def in_namespace(namespace: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *args]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a reused pid apart); None once it is gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _load_processes() -> dict[str, dict[str, Any]]:
    try:
        loaded: dict[str, dict[str, Any]] = json.loads(PROCESSES_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return loaded


def _alive(entry: Mapping[str, Any]) -> bool:
    started = _start_time(int(entry["pid"]))
    return started is not None and started == entry["start"]


def spawn(name: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Start a long-running process detached from this one (its own session, output to
    .demo/NAME.log), and record its pid for `down`."""
    log = STATE / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: S603 - our own commands, no shell
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    processes = _load_processes()
    processes[name] = {
        "pid": process.pid,
        "start": _start_time(process.pid) or "",
        "command": list(command),
    }
    PROCESSES_FILE.write_text(json.dumps(processes, indent=2) + "\n")
    return process.pid


def log_tail(name: str, lines: int = 25) -> str:
    try:
        text = (STATE / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    timeout: float = 60,
    watch: Sequence[str] = (),
    interval: float = 0.2,
) -> T:
    """Call ``probe`` until it returns something truthy and return that. Fails after
    ``timeout``, or as soon as one of the ``watch``ed processes has exited (with its log)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
        except (DemoError, OSError, ValueError, KeyError, http.client.HTTPException) as error:
            last_error = error
            result = None
        if result:
            return result
        processes = _load_processes()
        for name in watch:
            if name in processes and not _alive(processes[name]):
                raise DemoError(
                    f"the {name} exited while waiting for {what}; "
                    f"the end of .demo/{name}.log:\n{log_tail(name)}"
                )
        if time.monotonic() >= deadline:
            detail = f"\nlast error: {last_error}" if last_error else ""
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def use_built_binaries() -> Path:
    """Put hack/build-binaries.sh's folder first on PATH (building wireguard-go there when it is
    not yet), for this process and every one it starts: the edges and the benchmark then run
    that wireguard-go, the current release, rather than Debian's older package."""
    folder = run(str(BUILD_SCRIPT), "wireguard-go", timeout=600).strip().splitlines()[-1]
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != folder]
    os.environ["PATH"] = os.pathsep.join([folder, *rest])
    return Path(folder)


# --- Kubernetes --------------------------------------------------------------------------------


class Kube:
    """kubectl against the demo's cluster."""

    def __init__(self) -> None:
        folder = run(str(BUILD_SCRIPT), "kubectl").strip().splitlines()[-1]
        self.kubectl_path = Path(folder) / "kubectl"

    def __call__(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return run(
            str(self.kubectl_path),
            "--kubeconfig",
            str(KUBECONFIG),
            *args,
            input_text=input_text,
            check=check,
        )

    def apply(self, manifest: str) -> None:
        self("apply", "-f", "-", input_text=manifest)

    def get(self, *args: str) -> dict[str, Any] | None:
        """An object as JSON, or None when it does not exist (yet)."""
        out = self("get", *args, "-o", "json", "--ignore-not-found")
        if not out.strip():
            return None
        found: dict[str, Any] = json.loads(out)
        return found

    def secret(self, name: str) -> dict[str, str]:
        """A Secret's data, decoded."""
        found = self.get("secret", name, "-n", NAMESPACE)
        if found is None:
            raise DemoError(f"Secret {NAMESPACE}/{name} does not exist")
        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    def ready(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object when its Ready condition is True."""
        scope = ["-n", namespace] if namespace else []
        found = self.get(kind, name, *scope)
        conditions = ((found or {}).get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return found
        return None


# --- certificates ------------------------------------------------------------------------------


class DemoCA:
    """A throw-away certificate authority: control's serving certificate, the tunnel's."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kakuremichi demo CA")])
        now = datetime.now(UTC)
        usage = x509.KeyUsage(
            digital_signature=True,
            key_cert_sign=True,
            crl_sign=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @classmethod
    def load(cls, folder: Path) -> DemoCA:
        """The demo's CA as `up` left it (ca.pem, ca.key)."""
        ca = cls.__new__(cls)
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ca.key = key
        ca.certificate = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        return ca

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, *names: str) -> tuple[str, str]:
        """(certificate, private key) in PEM for DNS names and IP addresses."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.now(UTC) - timedelta(minutes=5)
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return (
            certificate.public_bytes(serialization.Encoding.PEM).decode(),
            _key_pem(key),
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def write_private(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def credentials_folder(secret: Mapping[str, str], folder: Path) -> Path:
    """A Secret volume as the kubelet mounts it: one file per key, in a private folder."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for key, value in secret.items():
        write_private(folder / key, value)
    return folder


# --- the network -------------------------------------------------------------------------------


def _namespaces() -> list[str]:
    listing = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _links() -> list[str]:
    listed = run("ip", "-br", "link", "show", check=False)
    return [line.split()[0].split("@")[0] for line in listed.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return bool(run("ip", "-br", "link", "show", "dev", name, check=False).strip())


def check_subnets() -> None:
    """Refuse to start when this machine already uses one of the demo's subnets."""
    taken = run("ip", "-o", "-4", "addr", "show")
    for subnet in SUBNETS:
        network = ipaddress.ip_network(subnet)
        for line in taken.splitlines():
            used = ipaddress.ip_interface(line.split()[3])
            if used.network.overlaps(network):
                raise DemoError(
                    f"{subnet} is already in use on this machine ({line.split()[1]}: {used});"
                    " the demo needs 192.168.237.0/24 to 192.168.239.0/24"
                )


def network_up() -> None:
    """The two namespaces and the three links of the module's picture."""
    for namespace in NETWORK_NAMESPACES:
        run("ip", "netns", "add", namespace)
        run(*in_namespace(namespace, "ip", "link", "set", "lo", "up"))

    def root_link(namespace: str, root_end: str, root_ip: str, host_ip: str) -> None:
        run("ip", "link", "add", "to-root", "netns", namespace, "type", "veth",
            "peer", "name", root_end)  # fmt: skip
        run("ip", "addr", "add", f"{root_ip}/24", "dev", root_end)
        run("ip", "link", "set", root_end, "up")
        run(*in_namespace(namespace, "ip", "addr", "add", f"{host_ip}/24", "dev", "to-root"))
        run(*in_namespace(namespace, "ip", "link", "set", "to-root", "up"))
        run(*in_namespace(namespace, "ip", "route", "add", "default", "via", root_ip))

    root_link(GATEWAY_NS, GATEWAY_ROOT_LINK, CONTROL_IP, GATEWAY_IP)
    root_link(AGENT_NS, AGENT_ROOT_LINK, AGENT_ROOT_IP, AGENT_IP)
    # The "internet" between the gateway's public address and the agent.
    run("ip", "link", "add", "to-agent", "netns", GATEWAY_NS, "type", "veth",
        "peer", "name", "to-gateway", "netns", AGENT_NS)  # fmt: skip
    for namespace, device, address in (
        (GATEWAY_NS, "to-agent", PUBLIC_IP),
        (AGENT_NS, "to-gateway", AGENT_PUBLIC_IP),
    ):
        run(*in_namespace(namespace, "ip", "addr", "add", f"{address}/24", "dev", device))
        run(*in_namespace(namespace, "ip", "link", "set", device, "up"))
    # Both edges find control by name; the agent reaches 192.168.239.1 through its default
    # route, since every address of the root namespace is local to it.
    for namespace in NETWORK_NAMESPACES:
        folder = Path("/etc/netns") / namespace
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(hosts_file({CONTROL_NAME: CONTROL_IP}))


def _free_port(host: str, preferred: int = 0) -> int:
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as probe:
            # As servers bind: a port left in TIME_WAIT by the previous demo is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            bound: int = probe.getsockname()[1]
            return bound
    raise DemoError(f"no free port on {host}")


def _kill_namespace_processes(namespace: str, grace: float = 3.0) -> int:
    """TERM, then KILL, every process in network namespace ``namespace``; how many there were."""
    seen = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run("ip", "netns", "pids", namespace, check=False).split()]
        if not pids:
            break
        seen = max(seen, len(pids))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not run("ip", "netns", "pids", namespace, check=False).split():
                return seen
            time.sleep(0.05)
    return seen


# --- the edge kit --------------------------------------------------------------------------------


def build_edge_kit() -> None:
    """What control serves the one-line installer, as the image keeps it: this checkout's wheel
    and every dependency's (a wheelhouse: the demo's hosts reach no package index), and the
    wireguard-go the demo runs, for this machine's architecture."""
    wheels = STATE / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(wheels), str(REPO),
        timeout=900)  # fmt: skip
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())
    built = shutil.which("wireguard-go")
    if arch and built:
        folder = STATE / "wireguard-go"
        folder.mkdir(exist_ok=True)
        shutil.copy2(built, folder / f"wireguard-go-linux-{arch}")


def edge_kit_args() -> list[str]:
    (wheel,) = (STATE / "wheels").glob("kakuremichi-*.whl")
    args = ["--edge-wheel", str(wheel), "--edge-wheelhouse", str(STATE / "wheels")]
    if (STATE / "wireguard-go").is_dir():
        args += ["--edge-wireguard-go", str(STATE / "wireguard-go")]
    return args


# --- up ----------------------------------------------------------------------------------------


def preflight() -> None:
    if sys.platform != "linux":
        raise DemoError("the demo needs Linux (network namespaces)")
    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root: it creates network namespaces and veth links "
            "(run `sudo make demo`)"
        )
    use_built_binaries()
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise DemoError(
            f"missing Debian packages: {' '.join(missing)} (`make deps` installs them: "
            f"apt-get install {' '.join(missing)})"
        )
    if not Path("/dev/net/tun").exists():
        raise DemoError("/dev/net/tun is missing: wireguard-go needs the tun device")
    if not KAKUREMICHI.exists():
        raise DemoError(
            f"{KAKUREMICHI} is missing: run the demo with the project's venv (make demo)"
        )


def demo_present() -> bool:
    return (
        STATE.exists()
        or any(n in _namespaces() for n in NETWORK_NAMESPACES)
        or any(_link_exists(link) for link in ROOT_LINKS)
    )


def up() -> None:
    started = time.monotonic()
    preflight()
    if demo_present():
        step("a demo is already here: taking it down first")
        down(quiet=True)
    check_subnets()

    STATE.mkdir(mode=0o700)
    step("starting the local cluster (hack/cluster.sh up)")
    run(str(CLUSTER_SCRIPT), "up", env={"KAKUREMICHI_CLUSTER_DIR": str(CLUSTER_DIR)}, timeout=600)
    kube = Kube()

    step(f"network namespaces {GATEWAY_NS} and {AGENT_NS}")
    network_up()

    step("a demo CA, control's certificate and the tunnel's")
    ca = DemoCA()
    ca_file = STATE / "ca.pem"
    ca_file.write_text(ca.pem)
    write_private(STATE / "ca.key", _key_pem(ca.key))
    cert, key = ca.issue(CONTROL_NAME, CONTROL_IP)
    (STATE / "control.crt").write_text(cert)
    write_private(STATE / "control.key", key)
    cert, key = ca.issue(DOMAIN)
    (STATE / f"{CERT_NAME}.crt").write_text(cert)
    write_private(STATE / f"{CERT_NAME}.key", key)
    # The origin's own certificate, for a TLS (passthrough) Tunnel: the gateway never sees it.
    cert, key = ca.issue(PASSTHROUGH_DOMAIN)
    (STATE / "origin-tls.crt").write_text(cert)
    write_private(STATE / "origin-tls.key", key)

    step(
        "what control serves the one-line installer: this checkout's wheel and its wheelhouse, "
        "wireguard-go"
    )
    build_edge_kit()
    port = _free_port(CONTROL_IP, PREFERRED_CONTROL_PORT)
    control_url = f"https://{CONTROL_NAME}:{port}"
    (STATE / "control-url").write_text(control_url)
    step(f"the operator, control channel {control_url} ({CONTROL_IP})")
    kube("create", "namespace", NAMESPACE)
    spawn(
        "operator",
        [str(KAKUREMICHI), "operator",
         "--db", f"sqlite:///{STATE / 'kakuremichi.db'}",
         "--system-namespace", NAMESPACE,
         # (every namespace: Ingresses and HTTPRoutes are served from wherever they are)
         "--cluster-agent", f"{NAMESPACE}/demo", "--endpoint-range", f"{AGENT_IP}/32",
         "--control-listen", f"{CONTROL_IP}:{port}", "--control-url", control_url,
         "--control-tls-cert", str(STATE / "control.crt"),
         "--control-tls-key", str(STATE / "control.key"),
         "--webhook-listen", f"127.0.0.1:{_free_port('127.0.0.1')}",
         "--webhook-cert-dir", str(STATE / "webhook"), *edge_kit_args()],
        env={"KUBECONFIG": str(KUBECONFIG)},
    )  # fmt: skip
    wait_for(lambda: _healthy(port, ca_file), "the operator's /healthz", 90, ["operator"])
    edge_env = {"SSL_CERT_FILE": str(ca_file)}

    step(f"a Node ({NODE}, ExternalIP {PUBLIC_IP}) and the Gateway pool demo on it")
    kube.apply(NODE_YAML)
    patch = {"status": {"addresses": [{"type": "ExternalIP", "address": PUBLIC_IP}]}}
    kube("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(patch))
    kube.apply(GATEWAY_YAML)
    daemonset_name = gateway_daemonset_name("demo")
    daemonset = wait_for(
        lambda: kube.get("daemonset", daemonset_name, "-n", NAMESPACE),
        f"the DaemonSet {daemonset_name}",
        60,
        ["operator"],
    )
    pod_spec = daemonset["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    pool = kube.secret(secret_volume_name(pod_spec, CREDENTIALS_MOUNT, container["name"]))
    folder = credentials_folder({"apiKey": pool["apiKey"]}, STATE / "gateway-credentials")
    # No scheduler or kubelet runs here: bind the DaemonSet's pod to the Node as the scheduler
    # would, and mint its pod-bound token as the kubelet would; with it the pod proves to
    # control that it is the pool's pod on that node.
    pod = wait_for(
        lambda: daemon_pod_for(
            kube.get("pods", "-n", NAMESPACE, "-l", f"{GATEWAY_LABEL}=demo"), NODE
        ),
        "the DaemonSet's pod",
        60,
        ["operator"],
    )
    pod_name, pod_uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    if not pod["spec"].get("nodeName"):
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}}  # fmt: skip
        kube("create", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}/binding",
             "-f", "-", input_text=json.dumps(binding))  # fmt: skip
    token = kube(
        "create", "token", pod["spec"]["serviceAccountName"], "-n", NAMESPACE,
        "--audience", POD_TOKEN_AUDIENCE, "--duration", "24h", "--bound-object-kind", "Pod",
        "--bound-object-name", pod_name, "--bound-object-uid", pod_uid,
    ).strip()  # fmt: skip
    token_folder = credentials_folder({"token": token}, STATE / "gateway-pod-token")
    mounts = {
        CREDENTIALS_MOUNT: folder,
        POD_TOKEN_MOUNT: token_folder,
        STATE_MOUNT: STATE / "gateway-state",
    }
    gateway_args = edge_command(container["args"], mounts, {"NODE_NAME": NODE})
    # The one addition to the DaemonSet's arguments: a WireGuard interface name of our own.
    gateway_args += ["--wireguard-interface", WIREGUARD_INTERFACES["gateway"]]
    spawn("gateway", in_namespace(GATEWAY_NS, str(KAKUREMICHI), *gateway_args), edge_env)

    step("the Agent demo, and a Pod into which the webhook injects its sidecar")
    kube.apply(AGENT_YAML)
    wait_for(
        lambda: kube.ready("agents.kakuremichi.io", "demo", NAMESPACE),
        "the Agent to be Ready",
        60,
        ["operator"],
    )
    wait_for(
        lambda: kube.get("mutatingwebhookconfiguration", "kakuremichi.io"),
        "the webhook configuration",
        60,
        ["operator"],
    )
    pod = wait_for(lambda: _create_injected_pod(kube), "the sidecar injection", 60, ["operator"])
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME]
    credentials = kube.secret(secret_volume_name(pod["spec"], CREDENTIALS_MOUNT, SIDECAR_NAME))
    folder = credentials_folder(credentials, STATE / "agent-credentials")
    mounts = {CREDENTIALS_MOUNT: folder, STATE_MOUNT: STATE / "agent-state"}
    agent_args = edge_command(sidecar["args"], mounts, {})
    agent_args += ["--wireguard-interface", WIREGUARD_INTERFACES["agent"]]
    spawn("agent", in_namespace(AGENT_NS, str(KAKUREMICHI), *agent_args), edge_env)

    step(f"the demo origin on 127.0.0.1:{ORIGIN_PORT} (TCP, UDP echo) and :{ORIGIN_TLS_PORT} "
         "(its own TLS) beside the agent")  # fmt: skip
    spawn(
        "origin",
        in_namespace(
            AGENT_NS, sys.executable, str(ORIGIN_SCRIPT), "127.0.0.1", str(ORIGIN_PORT),
            "--udp-echo", "--tls", str(ORIGIN_TLS_PORT), str(STATE / "origin-tls.crt"),
            str(STATE / "origin-tls.key"),
        ),
    )  # fmt: skip
    origin_probe = in_namespace(AGENT_NS, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                "--max-time", "2", f"http://127.0.0.1:{ORIGIN_PORT}/")  # fmt: skip
    wait_for(lambda: run(*origin_probe, check=False) == "200", "the origin", 30, ["origin"])

    step(f"the Tunnel demo: https://{DOMAIN} -> agent demo -> localhost:{ORIGIN_PORT}")
    cert_files = [f"--cert={STATE / CERT_NAME}.crt", f"--key={STATE / CERT_NAME}.key"]
    kube("create", "secret", "tls", CERT_NAME, "-n", NAMESPACE, *cert_files)
    kube.apply(TUNNEL_YAML)
    wait_for(
        lambda: kube.ready("tunnels.kakuremichi.io", "demo", NAMESPACE),
        "the Tunnel to be Ready",
        60,
        ["operator"],
    )

    step("waiting for the first HTTPS answer through the gateway")
    watch = ["operator", "gateway", "agent", "origin"]
    wait_for(lambda: probe_demo(ca_file) == "200", "HTTP 200 through the gateway", 120, watch)

    step(f"for Ingresses and HTTPRoutes: a second origin on {AGENT_IP}:{ROUTES_ORIGIN_PORT}, the "
         f"IngressClass and GatewayClass kakuremichi, the namespace {APPS_NAMESPACE} with a "
         "Gateway and certificates")  # fmt: skip
    origin = [sys.executable, str(ORIGIN_SCRIPT), AGENT_IP, str(ROUTES_ORIGIN_PORT)]
    spawn("routes-origin", in_namespace(AGENT_NS, *origin))
    kube.apply(CLASSES_YAML)
    kube("create", "namespace", APPS_NAMESPACE)
    for secret, domain in (("ingress-tls", INGRESS_DOMAIN), ("route-tls", ROUTE_DOMAIN)):
        cert, key = ca.issue(domain)
        (STATE / f"{secret}.crt").write_text(cert)
        write_private(STATE / f"{secret}.key", key)
        kube("create", "secret", "tls", secret, "-n", APPS_NAMESPACE,
             f"--cert={STATE / secret}.crt", f"--key={STATE / secret}.key")  # fmt: skip
    kube.apply(ROUTED_GATEWAY_YAML)
    (STATE / "ingress.yaml").write_text(INGRESS_YAML)
    (STATE / "httproute.yaml").write_text(HTTPROUTE_YAML)
    (STATE / "tcproute.yaml").write_text(TCPROUTE_YAML)
    summary(kube, time.monotonic() - started)


# --- add-host ----------------------------------------------------------------------------------

HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def without_wireguard_go() -> str:
    """This PATH without the folders that hold a wireguard-go."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not (Path(f) / "wireguard-go").exists())


def host_interface(name: str) -> str:
    """The added host's WireGuard interface (km + at most 13: the edges' rule)."""
    return f"kmh-{name}"


def host_subnets(number: int) -> tuple[str, str]:
    """(link to the root namespace, link to the gateway) of added host ``number`` (1-9)."""
    return f"192.168.{220 + number}.0/24", f"192.168.{210 + number}.0/24"


def host_domain(name: str) -> str:
    return f"{name}.kakuremichi.test"


def _hosts() -> dict[str, int]:
    try:
        loaded: dict[str, int] = json.loads(HOSTS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return loaded


def add_host(name: str) -> None:
    """Another machine behind NAT joins, the way the data-model document's Add-Agent flow has
    it: an Agent is created, `kakuremichi agent-command` prints the one-liner, and the new host
    runs it verbatim (with --prefix: a namespace has no systemd). Its installer gets
    kakuremichi and wireguard-go from control (the host reaches no package index); then the
    agent starts, beside an origin of its own, and a Tunnel publishes it."""
    started = time.monotonic()
    if not HOST_NAME.match(name):
        raise DemoError(
            f"{name!r}: a host name is 1-8 lower-case letters and digits, from a letter"
        )
    if os.geteuid() != 0:
        raise DemoError("adding a host needs root, as the demo does (sudo)")
    if not (STATE / "control-url").exists() or GATEWAY_NS not in _namespaces():
        raise DemoError("the demo is not up: run `make demo` first")
    hosts = _hosts()
    if name in hosts:
        raise DemoError(f"host {name} is already here (`make demo-down` removes everything)")
    number = next((n for n in range(1, MAX_HOSTS + 1) if n not in hosts.values()), None)
    if number is None:
        raise DemoError(f"the demo takes at most {MAX_HOSTS} added hosts")
    use_built_binaries()  # (the gateway's and the added host's wireguard-go, on PATH)
    kube = Kube()
    control_url = (STATE / "control-url").read_text().strip()
    namespace, root_link = f"{HOST_NS_PREFIX}{name}", f"{HOST_ROOT_LINK_PREFIX}{name}"
    to_root, to_gateway = (ipaddress.ip_network(n) for n in host_subnets(number))
    root_ip, host_ip = str(to_root[1]), str(to_root[2])
    gateway_side, host_public = str(to_gateway[1]), str(to_gateway[2])

    step(f"a network namespace {namespace}: a machine behind NAT, reaching control and the "
         "gateway, and no package index")  # fmt: skip
    hosts[name] = number
    HOSTS_FILE.write_text(json.dumps(hosts) + "\n")
    run("ip", "netns", "add", namespace)
    run(*in_namespace(namespace, "ip", "link", "set", "lo", "up"))
    run("ip", "link", "add", "to-root", "netns", namespace, "type", "veth", "peer", "name",
        root_link)  # fmt: skip
    run("ip", "addr", "add", f"{root_ip}/24", "dev", root_link)
    run("ip", "link", "set", root_link, "up")
    run(*in_namespace(namespace, "ip", "addr", "add", f"{host_ip}/24", "dev", "to-root"))
    run(*in_namespace(namespace, "ip", "link", "set", "to-root", "up"))
    run(*in_namespace(namespace, "ip", "route", "add", "default", "via", root_ip))
    device = f"to-{name}"
    run("ip", "link", "add", device, "netns", GATEWAY_NS, "type", "veth", "peer", "name",
        "to-gateway", "netns", namespace)  # fmt: skip
    run(*in_namespace(GATEWAY_NS, "ip", "addr", "add", f"{gateway_side}/24", "dev", device))
    run(*in_namespace(GATEWAY_NS, "ip", "link", "set", device, "up"))
    run(*in_namespace(namespace, "ip", "addr", "add", f"{host_public}/24", "dev", "to-gateway"))
    run(*in_namespace(namespace, "ip", "link", "set", "to-gateway", "up"))
    # The gateway's public address (its WireGuard endpoint) is over there.
    run(*in_namespace(namespace, "ip", "route", "add", f"{PUBLIC_IP}/32", "via", gateway_side))
    folder = Path("/etc/netns") / namespace
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text(hosts_file({CONTROL_NAME: CONTROL_IP}))

    step(f"the Agent {name}, and the one-liner `kakuremichi agent-command` prints for it")
    kube.apply(agent_yaml(name))
    wait_for(lambda: kube.ready("agents.kakuremichi.io", name, NAMESPACE), f"the Agent {name}",
             60, ["operator"])  # fmt: skip
    one_liner = run(
        str(KAKUREMICHI), "agent-command", name, "-n", NAMESPACE, "--control-url", control_url,
        "--ca-file", str(STATE / "ca.pem"), env={"KUBECONFIG": str(KUBECONFIG)},
    ).strip()  # fmt: skip
    root = STATE / "hosts" / name
    command = f"{one_liner} --prefix={root}"
    say(f"    {command}")
    step(f"running it in {namespace}")
    # A new machine has no wireguard-go of the demo's (nor kernel WireGuard, here): the
    # installer gets control's build.
    bare = without_wireguard_go()
    installed = run(*in_namespace(namespace, "env", f"PATH={bare}", "sh", "-c", command),
                    timeout=900)  # fmt: skip
    for line in installed.splitlines():
        say(f"    {line}")
    conf = dict(
        line.split("=", 1)
        for line in (root / "etc" / "kakuremichi" / "agent.conf").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )

    step(f"the agent on {name} (as its unit would run it), and an origin beside it")
    edge = root / "opt" / "kakuremichi" / "venv" / "bin" / "kakuremichi"
    spawn(f"agent-{name}", in_namespace(
        namespace, "env", f"PATH={bare}", str(edge), "agent",
        "--control-url", conf["KAKUREMICHI_CONTROL_URL"],
        "--api-key", conf["KAKUREMICHI_API_KEY"], "--ca-file", str(STATE / "ca.pem"),
        "--state-dir", str(root / "var" / "lib" / "kakuremichi"),
        "--wireguard-interface", host_interface(name),
    ))  # fmt: skip
    spawn(f"origin-{name}", in_namespace(
        namespace, sys.executable, str(ORIGIN_SCRIPT), "127.0.0.1", str(ORIGIN_PORT)
    ))  # fmt: skip

    domain = host_domain(name)
    step(f"the Tunnel {name}: https://{domain} -> agent {name} -> localhost:{ORIGIN_PORT}")
    cert, key = DemoCA.load(STATE).issue(domain)
    (STATE / f"{name}-tls.crt").write_text(cert)
    write_private(STATE / f"{name}-tls.key", key)
    kube("create", "secret", "tls", f"{name}-tls", "-n", NAMESPACE,
         f"--cert={STATE / name}-tls.crt", f"--key={STATE / name}-tls.key")  # fmt: skip
    kube.apply(tunnel_yaml(name, domain, name, f"{name}-tls"))
    watch = ["operator", "gateway", f"agent-{name}", f"origin-{name}"]
    wait_for(lambda: kube.ready("tunnels.kakuremichi.io", name, NAMESPACE),
             f"the Tunnel {name} to be Ready", 120, watch)  # fmt: skip
    wait_for(lambda: probe_demo(STATE / "ca.pem", domain) == "200",
             f"HTTP 200 from {domain} through the gateway", 120, watch)  # fmt: skip
    say("")
    say(f"host {name} is in ({time.monotonic() - started:.0f}s); its service over HTTPS:")
    say("")
    say(shlex.join(curl_command(STATE / "ca.pem", domain)))


def _healthy(port: int, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection(CONTROL_IP, port, context=context, timeout=2)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def _create_injected_pod(kube: Kube) -> dict[str, Any] | None:
    """Create the labelled Pod; the created object if the webhook gave it the sidecar, else
    None (the Pod deleted again, to try once more)."""
    kube("delete", "pod", "demo-origin", "-n", NAMESPACE, "--ignore-not-found", "--wait=true",
         "--timeout=20s")  # fmt: skip
    pod: dict[str, Any] = json.loads(kube("create", "-f", "-", "-o", "json", input_text=POD_YAML))
    if any(c["name"] == SIDECAR_NAME for c in pod["spec"]["containers"]):
        return pod
    return None


def probe_demo(ca_file: Path, domain: str = DOMAIN) -> str:
    """The HTTP status (text) of the printed curl command; "000" when no answer came."""
    command = curl_command(ca_file, domain)
    return run(command[0], "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
               *command[1:], check=False)  # fmt: skip


def summary(kube: Kube, seconds: float) -> None:
    kubectl = kube.kubectl_path
    say("")
    say(f"kakuremichi demo is up ({seconds:.0f}s). Reach it over HTTPS through the gateway")
    say("(as root, on this machine):")
    say("")
    say(shlex.join(curl_command(STATE / "ca.pem")))
    say("")
    say("An Ingress, and an HTTPRoute, to a server beside the agent (through the cluster agent):")
    say("")
    say(f"KUBECONFIG={KUBECONFIG} {kubectl} apply -f {STATE}/ingress.yaml")
    say(shlex.join(curl_command(STATE / "ca.pem", INGRESS_DOMAIN)))
    say(f"KUBECONFIG={KUBECONFIG} {kubectl} apply -f {STATE}/httproute.yaml")
    say(shlex.join(curl_command(STATE / "ca.pem", ROUTE_DOMAIN)))
    say(f"KUBECONFIG={KUBECONFIG} {kubectl} apply -f {STATE}/tcproute.yaml   "
        f"# the Gateway's TCP port {ROUTE_TCP_PORT}, forwarded as bytes")  # fmt: skip
    say(shlex.join(["curl", f"http://{GATEWAY_IP}:{ROUTE_TCP_PORT}/"]))
    say("")
    say(f"  logs       {STATE}/{{operator,gateway,agent,origin}}.log")
    say(f"  resources  export KUBECONFIG={KUBECONFIG}")
    say(f"             {kubectl} get kakuremichi -A")
    say(f"             {kubectl} get kmtunnel -n {NAMESPACE} -o yaml")
    say(f"  edges      ip netns exec {GATEWAY_NS} curl -s 127.0.0.1:9470/metrics")
    say(f"             ip netns exec {AGENT_NS} curl -s 127.0.0.1:9471/metrics")
    say(f"  status     {sys.executable} hack/demo.py status")
    say("  a host     make demo-add-host NAME=laptop   (another machine joins by the one-liner)")
    say("  stop       make demo-down")


# --- down and status ---------------------------------------------------------------------------


def _stray_operators() -> list[int]:
    """Operators of this demo whose pid file is gone: their --db names the state folder."""
    marker = f"sqlite:///{STATE}/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "operator" in argv and any(arg.startswith(marker) for arg in argv):
            found.append(int(proc.name))
    return found


def _stop(pids: Sequence[int], grace: float = 10.0) -> None:
    """TERM, then KILL after ``grace`` seconds, each process (and its process group)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_start_time(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _start_time(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def down(quiet: bool = False) -> None:
    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root to remove its network namespaces (sudo make demo-down)"
        )
    removed: list[str] = []
    processes = _load_processes()
    order = [n for n in processes if n not in PROCESS_NAMES] + list(PROCESS_NAMES)
    pids = [int(processes[name]["pid"]) for name in order if name in processes
            and _alive(processes[name])]  # fmt: skip
    pids += [pid for pid in _stray_operators() if pid not in pids]
    if pids:
        _stop(pids)
        removed.append(f"{len(pids)} processes")
    present = _namespaces()
    hosts = [n for n in present if n.startswith(HOST_NS_PREFIX)]
    for namespace in [*hosts, *NETWORK_NAMESPACES]:
        if namespace in present:
            _kill_namespace_processes(namespace)
            run("ip", "netns", "del", namespace, check=False)
            removed.append(f"namespace {namespace}")
        shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
    host_links = [link for link in _links() if link.startswith(HOST_ROOT_LINK_PREFIX)]
    for link in [*ROOT_LINKS, *host_links]:  # gone with their namespaces, unless a run stopped
        if _link_exists(link):
            run("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
    interfaces = [*WIREGUARD_INTERFACES.values(),
                  *(host_interface(n.removeprefix(HOST_NS_PREFIX)) for n in hosts)]  # fmt: skip
    for interface in interfaces:
        with contextlib.suppress(FileNotFoundError):
            (WIREGUARD_UAPI_DIR / f"{interface}.sock").unlink()
    if CLUSTER_DIR.exists():
        run(str(CLUSTER_SCRIPT), "down", env={"KAKUREMICHI_CLUSTER_DIR": str(CLUSTER_DIR)},
            check=False)  # fmt: skip
        removed.append(f"the cluster ({CLUSTER_DIR.name}/)")
    if STATE.exists():
        shutil.rmtree(STATE)
        removed.append(f"{STATE.name}/")
    if not quiet:
        say(f"demo down: removed {', '.join(removed)}" if removed else "demo down: nothing was up")


def status() -> int:
    """Say what runs; 0 when the demo serves."""
    processes = _load_processes()
    if not processes and not demo_present():
        say("demo: down")
        return 1
    for name in reversed(PROCESS_NAMES):
        entry = processes.get(name)
        state = "running" if entry and _alive(entry) else "not running"
        pid = f" (pid {entry['pid']})" if entry else ""
        say(f"  {name:9}{state}{pid}")
    present = _namespaces()
    for namespace in NETWORK_NAMESPACES:
        say(f"  {namespace:15}{'present' if namespace in present else 'missing'}")
    cluster = run(str(CLUSTER_SCRIPT), "status", env={"KAKUREMICHI_CLUSTER_DIR": str(CLUSTER_DIR)},
                  check=False).strip()  # fmt: skip
    say(f"  cluster  {cluster or 'down'}")
    code = probe_demo(STATE / "ca.pem") if (STATE / "ca.pem").exists() else "000"
    serving = code == "200"
    say(f"demo: {'serving' if serving else 'not serving'} (HTTP {code})")
    if serving:
        say(shlex.join(curl_command(STATE / "ca.pem")))
    return 0 if serving else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/demo.py",
        description="kakuremichi end to end on this machine: cluster, operator, gateway, agent.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "add-host"])
    parser.add_argument("name", nargs="?", help="add-host: the new host's (and Agent's) name")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        elif args.command == "add-host":
            if not args.name:
                parser.error("add-host needs a NAME (e.g. hack/demo.py add-host laptop)")
            add_host(args.name)
        else:
            return status()
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        if args.command == "up" and STATE.exists():
            print(
                f"demo: what was started is left for a look (logs in {STATE}); "
                "`make demo-down` removes it, `make demo` starts over",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; `make demo-down` removes what was started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
