"""The Helm chart: it lints and renders with the value sets users reach for, its schema refuses
bad values by name, it installs onto the API server, and the operator — started with the
arguments of the chart's Deployment and the token of the chart's ServiceAccount — completes a
full reconcile and teardown with exactly the chart's RBAC, while requests outside it are
refused. There is no kubelet, so the operator runs as a process on this machine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes import client

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, CERTIFICATE, GATEWAY, TUNNEL
from kakuremichi.control.gateway_api import GATEWAY_CONTROLLER
from kakuremichi.control.ingress_routes import INGRESS_CONTROLLER
from kakuremichi.control.ingresses import CLAIMS_CONFIG_MAP
from kakuremichi.control.manifests import AGENT_LABEL, SIDECAR_NAME
from tests.infra import binaries, kubelet, ports
from tests.infra.cluster import Cluster, unique_name
from tests.infra.edge_sessions import EdgeSessions
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA

CHART = binaries.REPO / "charts" / "kakuremichi"
WEBHOOK_CONFIGURATION = "kakuremichi.io"
# What a missing permission looks like in the operator's log (kopf and the kubernetes client).
# A status code, not the milliseconds of a log timestamp ("05:31:14,403").
RBAC_TROUBLE = re.compile(
    r"(?<![,.])\b403\b|forbidden|Not enough (RBAC )?permissions", re.IGNORECASE
)


@dataclass
class Helm:
    binary: Path
    home: Path

    def run(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # Helm's own config and cache stay in the test's folder, not the user's.
        env = {**os.environ, **{f"HELM_{part}_HOME": str(self.home / part.lower())
                                for part in ("CACHE", "CONFIG", "DATA")}}  # fmt: skip
        command = [str(self.binary), *args]
        if kubeconfig is not None:
            command += ["--kubeconfig", str(kubeconfig)]
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)}:\n{result.stderr}")
        return result

    def render(self, *settings: str) -> list[dict[str, Any]]:
        """``helm template`` with ``--set`` for each of ``settings``; the documents."""
        sets = [arg for setting in settings for arg in ("--set", setting)]
        out = self.run("template", "km", str(CHART), "--namespace", "kmsys", *sets).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    found = binaries.find("helm")
    if found is None:
        pytest.skip("missing helm: run hack/build-binaries.sh helm")
    return Helm(found, tmp_path_factory.mktemp("helm"))


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the rendered chart"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(docs, "Deployment", "km-kakuremichi")
    found: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return found


# Value sets users reach for; each is linted and rendered.
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "load-balancer": ["service.type=LoadBalancer", "controlUrl=https://203.0.113.7:8480",
                      "service.externalTrafficPolicy=Local"],
    "node-port": ["service.type=NodePort", "service.nodePort=30480"],
    "ingress": ["ingress.enabled=true", "ingress.host=control.example.com",
                "ingress.className=nginx", "ingress.tls[0].secretName=control-public"],
    "no-persistence": ["persistence.enabled=false"],
    "existing-secret": ["controlTLS.existingSecret=my-control-tls"],
    "namespaced": ["watchNamespaces={apps,web}", "clusterAgent.enabled=false",
                   "acme.email=ops@example.com", "acme.eab.kid=k1",
                   "acme.eab.hmacKey=c2VjcmV0", "excludeCIDRs={10.96.0.0/12}"],
    "plain": ["controlTLS.enabled=false", "webhook.enabled=false"],
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_lints_and_renders(helm: Helm, variant: str) -> None:
    sets = [arg for setting in VARIANTS[variant] for arg in ("--set", setting)]
    helm.run("lint", "--strict", str(CHART), *sets)
    docs = helm.render(*VARIANTS[variant])
    operator = container(docs)
    args = operator["args"]
    assert args[0] == "operator"
    assert only(docs, "Deployment", "km-kakuremichi")["spec"]["strategy"] == {"type": "Recreate"}
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    service = only(docs, "Service", "km-kakuremichi")
    volumes = {
        v["name"]: v
        for v in only(docs, "Deployment", "km-kakuremichi")["spec"]["template"]["spec"]["volumes"]
    }
    if variant == "defaults":
        assert "--all-namespaces" in args
        assert "--control-url=https://km-kakuremichi.kmsys.svc:8480" in args
        # Registered by Service reference: the API server resolves it (not cluster DNS).
        assert "--webhook-service=kmsys/km-kakuremichi-webhook:9443" in args
        assert service["spec"]["type"] == "ClusterIP"
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "km-kakuremichi-data"
        # No webhook configuration of our own: the operator (kopf) manages it.
        assert not [d for d in docs if "WebhookConfiguration" in d["kind"]]
        # The cluster agent: its Agent and Deployment, and the IngressClass it serves.
        assert "--cluster-agent=$(POD_NAMESPACE)/km-kakuremichi-cluster-agent" in args
        assert only(docs, "Agent")["metadata"]["name"] == "km-kakuremichi-cluster-agent"
        assert only(docs, "IngressClass")["spec"]["controller"] == INGRESS_CONTROLLER
        # (no GatewayClass where the Gateway API is not installed: its kind would be refused)
        assert not [d for d in docs if d["kind"] == "GatewayClass"]
        agent = only(docs, "Deployment", "km-kakuremichi-cluster-agent")["spec"]["template"]
        (secret,) = [v for v in agent["spec"]["volumes"] if v["name"] == "credentials"]
        assert secret["secret"]["secretName"] == "kakuremichi-agent-km-kakuremichi-cluster-agent"
    elif variant == "load-balancer":
        assert service["spec"]["type"] == "LoadBalancer"
        assert "--control-url=https://203.0.113.7:8480" in args
        # The webhook never rides on the public Service.
        assert [p["name"] for p in service["spec"]["ports"]] == ["control"]
    elif variant == "node-port":
        assert service["spec"]["ports"][0]["nodePort"] == 30480
    elif variant == "ingress":
        ingress = only(docs, "Ingress")
        assert ingress["spec"]["rules"][0]["host"] == "control.example.com"
        assert ingress["spec"]["tls"][0]["hosts"] == ["control.example.com"]
        assert "--control-url=https://control.example.com" in args
    elif variant == "no-persistence":
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert volumes["data"] == {"name": "data", "emptyDir": {}}
    elif variant == "existing-secret":
        assert not [d for d in docs if d["kind"] == "Secret"]
        assert volumes["control-tls"]["secret"]["secretName"] == "my-control-tls"
    elif variant == "namespaced":
        assert {"--namespace=apps", "--namespace=web", "--acme-eab-kid=k1"} <= set(args)
        assert "--all-namespaces" not in args
        assert not [a for a in args if a.startswith("--cluster-agent")]
        eab = next(e for e in operator["env"] if e["name"] == "KAKUREMICHI_ACME_EAB_HMAC_KEY")
        assert eab["valueFrom"]["secretKeyRef"]["name"] == "km-kakuremichi-acme-eab"
        roles = [
            d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "km-kakuremichi"
        ]
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["apps", "web"]
        # The namespaced rules in the Roles are exactly those of the all-namespaces ClusterRole.
        everywhere = only(helm.render(), "ClusterRole")["rules"]
        assert all(rule in everywhere for rule in roles[0]["rules"])
        cluster_rules = only(docs, "ClusterRole")["rules"]
        assert not [r for r in cluster_rules if "secrets" in r["resources"]]
    elif variant == "plain":
        assert "--control-url=http://km-kakuremichi.kmsys.svc:8480" in args
        assert not [a for a in args if a.startswith(("--control-tls", "--webhook"))]
        assert not [d for d in docs if d["kind"] == "Secret"]


def test_the_gateway_class_is_made_where_the_gateway_api_is_installed(helm: Helm) -> None:
    api = "gateway.networking.k8s.io/v1/GatewayClass"
    out = helm.run("template", "km", str(CHART), "--namespace", "kmsys", "--api-versions", api)
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    made = only(docs, "GatewayClass", "kakuremichi")
    assert made["spec"]["controllerName"] == GATEWAY_CONTROLLER
    gateway_api = [r for r in only(docs, "ClusterRole")["rules"]
                   if r["apiGroups"] == ["gateway.networking.k8s.io"]]  # fmt: skip
    assert {v for r in gateway_api for v in r["verbs"]} == {"get", "list", "watch", "patch",
                                                             "update"}  # fmt: skip


def test_schema_refuses_bad_values_by_name(helm: Helm) -> None:
    bad = [("service.type=Foo", "/service/type"), ("servce.type=ClusterIP", "servce"),
           ("subnetPool=lots", "/subnetPool"), ("controlUrl=ftp://x", "/controlUrl")]  # fmt: skip
    for setting, field in bad:
        result = helm.run("template", "km", str(CHART), "--set", setting, check=False)
        assert result.returncode != 0, setting
        assert "schema" in result.stderr and field in result.stderr, result.stderr
    result = helm.run("template", "km", str(CHART), "--set", "ingress.enabled=true", check=False)
    assert "ingress.enabled needs ingress.host" in result.stderr


# --- installed, and the operator running with the chart's RBAC --------------------------------


def token_kubeconfig(kube: Cluster, token: str, path: Path) -> Cluster:
    """A kubeconfig for the same API server that authenticates with ``token`` only."""
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "chart-sa", "user": {"token": token}}],
        "contexts": [{"name": "chart-sa",
                      "context": {"cluster": cluster["name"], "user": "chart-sa"}}],
        "current-context": "chart-sa",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return Cluster(path, kube.kubectl_path, None)


def kubelet_env(kube: Cluster, namespace: str) -> dict[str, str]:
    """What the kubelet would give the operator's container to expand ``$(VAR)`` in its args:
    POD_NAMESPACE (downward API) and the service links of the namespace's Services."""
    env = {"POD_NAMESPACE": namespace}
    services = yaml.safe_load(kube.kubectl("get", "services", "-n", namespace, "-o", "yaml"))
    for service in services["items"]:
        link = service["metadata"]["name"].upper().replace("-", "_")
        env[f"{link}_SERVICE_HOST"] = service["spec"]["clusterIP"]
    return env


def localize(args: list[str], env: dict[str, str], overrides: dict[str, str]) -> list[str]:
    """The Deployment's args as this machine runs them: ``$(VAR)`` expanded as the kubelet does,
    and the listed flags (each must be there) pointed at local addresses and files."""
    out, seen = [], set()
    for arg in args:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        flag, equals, _ = arg.partition("=")
        if equals and flag in overrides:
            arg = f"{flag}={overrides[flag]}"
            seen.add(flag)
        out.append(arg)
    assert seen == set(overrides), f"the chart does not pass {set(overrides) - seen}"
    return out


def flag_value(args: list[str], flag: str) -> str:
    return next(a.partition("=")[2] for a in args if a.startswith(f"{flag}="))


@dataclass
class Installed:
    kube: Cluster
    release: str
    system: str
    apps: str
    as_operator: Cluster
    operator: OperatorProcess
    liveness_url: str
    gateways: tuple[str, str]
    """Names for the test's External and InCluster Gateways (cluster-scoped)."""


@pytest.fixture(scope="module")
def installed(
    kube: Cluster, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """The chart installed (watching one namespace) and the operator running as its Deployment
    says, with its ServiceAccount's token."""
    with chart_operator(kube, helm, tmp_path_factory.mktemp("chart-operator")) as made:
        yield made


@contextlib.contextmanager
def chart_operator(
    kube: Cluster, helm: Helm, tmp_path: Path, everywhere: bool = False
) -> Iterator[Installed]:
    """The chart installed and its operator running with the chart's RBAC only: watching one
    namespace (``apps``), or (``everywhere``) every namespace with the cluster agent on."""
    release, system, apps = unique_name("kmh"), unique_name("kmhsys"), unique_name("kmhapp")
    gateways = (unique_name("kmhext"), unique_name("kmhpool"))
    kube.kubectl("create", "namespace", apps)
    kubeconfig = kube.kubeconfig
    fullname = f"{release}-kakuremichi"
    operator: OperatorProcess | None = None
    # Everywhere: the cluster agent's IngressClass and GatewayClass are left to the cluster (they
    # are cluster-scoped; Ingresses naming class kakuremichi are served without it, and the
    # tests make the GatewayClass).
    scope = (
        [
            "--set",
            "clusterAgent.ingressClass.create=false",
            "--set",
            "clusterAgent.gatewayClass.create=false",
        ]
        if everywhere
        else ["--set", f"watchNamespaces={{{apps}}}", "--set", "clusterAgent.enabled=false"]
    )
    try:
        # CRDs are the cluster's already (hack/cluster.sh installs crds/): --skip-crds.
        notes = helm.run(
            "install", release, str(CHART), "--namespace", system, "--create-namespace",
            "--skip-crds", *scope, "--set", "controlTLS.ipAddresses={127.0.0.1}",
            kubeconfig=kubeconfig,
        )  # fmt: skip
        assert "kakuremichi agent-command" in notes.stdout  # NOTES.txt: what to do next
        token = kube.kubectl("create", "token", fullname, "-n", system, "--duration", "1h")
        as_operator = token_kubeconfig(kube, token.strip(), tmp_path / "operator.kubeconfig")

        deployment = yaml.safe_load(kube.kubectl("get", "deployment", fullname, "-n", system,
                                                 "-o", "yaml"))  # fmt: skip
        spec = deployment["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == fullname
        chart_container = spec["containers"][0]
        tls = Secrets(kube, system).read(f"{fullname}-control-tls")
        assert tls is not None
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (tmp_path / name).write_text(tls[name])
            (tmp_path / name).chmod(0o600)
        port, liveness = ports.free_port(), ports.free_port()
        env = kubelet_env(kube, system)
        # In a Pod, the API server would call the webhook through its Service.
        in_pod = localize(chart_container["args"], env, {})
        assert flag_value(in_pod, "--webhook-service") == f"{system}/{fullname}-webhook:9443"
        assert flag_value(in_pod, "--system-namespace") == system
        args = localize(
            chart_container["args"],
            env,
            {
                "--db": f"sqlite:///{tmp_path / 'kakuremichi.db'}",
                "--control-listen": f"127.0.0.1:{port}",
                "--control-tls-cert": str(tmp_path / "tls.crt"),
                "--control-tls-key": str(tmp_path / "tls.key"),
                "--edge-ca-file": str(tmp_path / "ca.crt"),
                "--webhook-listen": f"127.0.0.1:{ports.free_port()}",
                # No kube-proxy here: the API server dials the process itself, by URL.
                "--webhook-service": "",
                "--webhook-cert-dir": str(tmp_path / "webhook"),
                "--liveness": f"http://127.0.0.1:{liveness}/healthz",
            },
        )
        assert args[0] == "operator"
        control_url = flag_value(args, "--control-url")
        operator = OperatorProcess(
            kube=as_operator,
            namespace=apps,
            db_path=tmp_path / "kakuremichi.db",
            log_path=tmp_path / "operator.log",
            control_url=control_url,
            args=args[1:],
            ca_file=tmp_path / "ca.crt",  # the chart's generated CA signs the served certificate
            health_url=f"https://127.0.0.1:{port}/healthz",
        )
        operator.start()
        yield Installed(kube, release, system, apps, as_operator, operator,
                        f"http://127.0.0.1:{liveness}/healthz", gateways)  # fmt: skip
    finally:
        if operator is not None:
            operator.stop()
        remove_leftovers(kube, apps, gateways)
        helm.run("uninstall", release, "--namespace", system, kubeconfig=kubeconfig, check=False)
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            kube.kubectl("delete", kind, WEBHOOK_CONFIGURATION, "--ignore-not-found", check=False)
        for namespace in (apps, system):
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def remove_leftovers(kube: Cluster, apps: str, gateways: tuple[str, str]) -> None:
    """After a failed run: objects whose finalizer the operator could not take off would keep
    their namespace terminating and show up in other tests' listings."""
    left = kube.kubectl("get", "agents,tunnels,certificates", "-n", apps, "-o", "name",
                        check=False).split()  # fmt: skip
    gone = kube.kubectl("get", "gateways.kakuremichi.io", *gateways, "-o", "name",
                        "--ignore-not-found", check=False).split()  # fmt: skip
    for name, namespace in [(n, ["-n", apps]) for n in left if "/" in n] + [
        (n, []) for n in gone if "/" in n
    ]:
        kube.kubectl("patch", name, *namespace, "--type=merge",
                     "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
        kube.kubectl("delete", name, *namespace, "--wait=false", check=False)


def test_helm_upgrade_keeps_the_control_certificate(
    kube: Cluster, helm: Helm, installed: Installed
) -> None:
    secrets = Secrets(kube, installed.system)
    name = f"{installed.release}-kakuremichi-control-tls"
    before = secrets.read(name)
    upgrade = ["upgrade", installed.release, str(CHART), "--namespace", installed.system,
               "--reuse-values"]  # fmt: skip
    helm.run(*upgrade, kubeconfig=kube.kubeconfig)
    assert secrets.read(name) == before  # found with lookup, not generated again
    helm.run(*upgrade, "--set", "controlTLS.dnsNames={control.example.com}",
             kubeconfig=kube.kubeconfig)  # fmt: skip
    after = secrets.read(name)
    assert before is not None and after is not None
    assert after["tls.crt"] != before["tls.crt"]  # new names, so re-signed …
    assert after["ca.crt"] == before["ca.crt"]  # … by the same CA, which edges may have pinned


def test_operator_reconciles_with_the_charts_rbac_only(installed: Installed) -> None:
    try:
        reconcile_and_tear_down(installed)
        check_refusals(installed.as_operator, installed.apps)
    except Exception as error:
        # A missing permission often shows as a wait that times out: say so.
        if trouble := rbac_trouble(installed.operator):
            raise AssertionError(f"the operator hit RBAC limits:\n{trouble}") from error
        raise
    trouble = rbac_trouble(installed.operator)
    assert not trouble, f"the operator hit RBAC limits:\n{trouble}"


def rbac_trouble(operator: OperatorProcess) -> str:
    """The operator's log records (a line with a time stamp and its continuation lines) that
    say it was forbidden something; a write into a namespace being deleted (a test's cleanup
    racing the operator) is refused for that, not for RBAC."""
    records: list[str] = []
    for line in operator.log().splitlines():
        if records and not re.match(r"\d{4}-\d{2}-\d{2} ", line):
            records[-1] += "\n" + line
        else:
            records.append(line)
    return "\n".join(
        [
            record for record in records
            if RBAC_TROUBLE.search(record) and "NamespaceTerminating" not in record
        ][:20]
    )  # fmt: skip


def reconcile_and_tear_down(installed: Installed) -> None:
    kube, apps, system = installed.kube, installed.apps, installed.system

    def alive() -> bool:
        with urllib.request.urlopen(installed.liveness_url, timeout=5) as response:
            return bool(response.status == 200)

    wait_until(alive, "kopf's liveness endpoint (the chart's startup and liveness probes)")

    agents, tunnels = Objects(kube, apps, AGENT), Objects(kube, apps, TUNNEL)
    certificates, gateways = Objects(kube, apps, CERTIFICATE), Objects(kube, apps, GATEWAY)
    app_secrets, system_secrets = Secrets(kube, apps), Secrets(kube, system)
    external, pool = installed.gateways
    domain = f"{unique_name('chart')}.example.com"
    opened: list[EdgeSessions] = []
    try:
        agents.create("home")
        agent = agents.ready("home")
        assert app_secrets.read(agent["credentialsSecret"]) is not None
        # Its edge connects (a Tunnel serves only while its Agent's edge is connected).
        assert installed.operator.health_url is not None
        edges = EdgeSessions(installed.operator.health_url.removesuffix("/healthz"),
                             installed.operator.ca_file)  # fmt: skip
        opened.append(edges)
        edges.connect_agent(kube, apps, "home")

        gateways.create(external, {"mode": "External", "publicIP": "203.0.113.10"})
        gateway = gateways.ready(external)
        assert system_secrets.read(gateway["credentialsSecret"]) is not None
        gateways.create(pool, {"mode": "InCluster"})
        gateways.ready(pool, reason="RolledOut")
        daemonset = ("daemonset", f"kakuremichi-gateway-{pool}", "-n", system)
        kube.kubectl("get", *daemonset)
        # A changed pool replaces its DaemonSet.
        gateways.patch_spec(pool, {"nodeSelector": {"edge": "yes"}})
        selector = "jsonpath={.spec.template.spec.nodeSelector.edge}"
        wait_until(lambda: kube.kubectl("get", *daemonset, "-o", selector) == "yes",
                   "the DaemonSet to follow the Gateway")  # fmt: skip
        check_pool_admission(installed, pool)

        issued = TestCA().issue(domain)
        app_secrets.put_tls("app-tls", issued.certificate_pem, issued.private_key_pem)
        tunnels.create("app", {"domain": domain, "agent": "home", "target": "localhost:8080",
                               "tls": {"issuer": "Secret", "secretName": "app-tls"}})  # fmt: skip
        assert tunnels.ready("app")["url"] == f"https://{domain}"
        certificates.ready("app")

        check_webhook(installed)
        core = client.CoreV1Api(kube.api_client())

        def events(kind: str, name: str) -> set[str]:
            selector = f"involvedObject.kind={kind},involvedObject.name={name}"
            listed = core.list_namespaced_event(apps, field_selector=selector)
            return {event.reason or "" for event in listed.items}

        wait_until(lambda: "Serving" in events("Tunnel", "app"), "the Tunnel's Events")
        wait_until(lambda: "Provisioned" in events("Agent", "home"), "the Agent's Events")
        wait_until(lambda: events("Certificate", "app"), "the Certificate's Events")
    finally:
        for sessions in opened:
            sessions.close()
        # While the operator runs, so that its finalizers come off.
        tunnels.delete_all(timeout=20)
        agents.delete_all(timeout=20)
        gateways.delete_all()
    wait_until(lambda: not app_secrets.read("kakuremichi-agent-home"), "the Agent's Secret to go")
    wait_until(lambda: not system_secrets.read(f"kakuremichi-gateway-{external}"),
               "the Gateway's Secret to go")  # fmt: skip


def check_pool_admission(installed: Installed, pool: str) -> None:
    """A pool's pod proves itself with its pod-bound token and is admitted as its node: the
    ServiceAccount the operator made for the pool, the TokenReview and the pod read are all
    within the chart's RBAC."""
    kube, system = installed.kube, installed.system
    api = kube.api_client()
    core = client.CoreV1Api(api)
    node = unique_name("kmhnode")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node, labels={"edge": "yes"})))
    try:
        address = {"type": "ExternalIP", "address": "203.0.113.40"}
        core.patch_node_status(node, {"status": {"addresses": [address]}})
        placed = kubelet.place(api, system, f"kakuremichi-gateway-{pool}", node)
        token = kubelet.mint_token(
            api, system, placed.service_account, placed.audience, (placed.name, placed.uid)
        )
        pool_key = (Secrets(kube, system).read(f"kakuremichi-gateway-{pool}") or {})["apiKey"]
        assert installed.operator.health_url is not None and installed.operator.ca_file
        url = installed.operator.health_url.replace("https://", "wss://").replace("/healthz", "/ws")
        tls = ssl.create_default_context(cafile=str(installed.operator.ca_file))
        auth = protocol.AuthMessage(api_key=pool_key, node_name=node, pod_token=token)

        async def first_frame() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http, http.ws_connect(url, ssl=tls) as ws:
                await ws.send_str(protocol.encode(auth))
                frame = await ws.receive(timeout=15)
                assert frame.type == aiohttp.WSMsgType.TEXT, (frame, ws.close_code)
                found: dict[str, Any] = json.loads(frame.data)
                return found

        identity = asyncio.run(first_frame())
        assert identity["type"] == "identity" and identity["data"]["name"] == node, identity
    finally:
        kubelet.delete_pods(api, system)
        core.delete_node(node)


def check_webhook(installed: Installed) -> None:
    """kopf configured kakuremichi.io with the chart's RBAC, and the webhook (which lists Pods
    with the operator's token) injects the sidecar."""
    kube = installed.kube

    def configured() -> list[dict[str, Any]]:
        found = yaml.safe_load(kube.kubectl("get", "mutatingwebhookconfiguration",
                                            WEBHOOK_CONFIGURATION, "-o", "yaml"))  # fmt: skip
        hooks: list[dict[str, Any]] = found.get("webhooks") or []
        return hooks

    (hook,) = wait_until(configured, "the MutatingWebhookConfiguration")
    assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
    core = client.CoreV1Api(kube.api_client())
    body = client.V1Pod(
        metadata=client.V1ObjectMeta(name="web", labels={AGENT_LABEL: "home"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx")]),
    )
    created: Any = wait_until(
        lambda: core.create_namespaced_pod(installed.apps, body), "the webhook to answer"
    )
    sidecar = next(c for c in created.spec.containers if c.name == SIDECAR_NAME)
    assert list(sidecar.args)[:3] == ["agent", "--control-url", installed.operator.control_url]
    core.delete_namespaced_pod("web", installed.apps, grace_period_seconds=0)


def check_refusals(as_operator: Cluster, apps: str) -> None:
    """Requests outside the chart's RBAC, made with the operator's token, are refused."""
    for args in [
        ("get", "secrets", "-n", "kube-system"),
        ("get", "secrets", "-n", "default"),
        ("delete", "node", "any-node"),
        ("create", "clusterrole", unique_name("kmh"), "--verb=get", "--resource=pods"),
        ("create", "deployment", "x", "--image=nginx", "-n", apps),
        ("delete", "crd", "agents.kakuremichi.io"),
    ]:
        out = as_operator.kubectl(*args, check=False)
        assert "forbidden" in out.lower(), f"kubectl {' '.join(args)}: {out}"
    # The token does reach what the chart grants (so the refusals are not a broken token), and
    # kopf may post the Events of cluster-scoped Gateways (on failures) into "default".
    for args in [("list", "secrets", "-n", apps), ("create", "events", "-n", "default")]:
        assert as_operator.kubectl("auth", "can-i", *args).strip() == "yes", args


def test_the_sealing_key_lives_in_a_secret_helm_does_not_own(
    kube: Cluster, helm: Helm, installed: Installed
) -> None:
    """The operator, started with the chart's arguments under the chart's RBAC, made the key's
    Secret; no key sits beside the database; an upgrade keeps it."""
    secrets = Secrets(kube, installed.system)
    name = f"{installed.release}-kakuremichi-sealing-key"
    before = wait_until(lambda: secrets.read(name), "the sealing key's Secret")
    assert len(base64.b64decode(before["sealing.key"])) == 32
    assert not (installed.operator.db_path.parent / "sealing.key").exists()
    managed = kube.kubectl("get", "secret", name, "-n", installed.system, "-o",
                           "jsonpath={.metadata.labels}")  # fmt: skip
    assert "Helm" not in managed  # not the chart's: an uninstall or upgrade leaves it alone
    helm.run("upgrade", installed.release, str(CHART), "--namespace", installed.system,
             "--reuse-values", kubeconfig=kube.kubeconfig)  # fmt: skip
    assert secrets.read(name) == before


def test_ingresses_and_httproutes_are_served_with_the_charts_rbac_only(
    kube: Cluster, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The chart with its defaults (every namespace, the cluster agent): the operator, with the
    chart's ServiceAccount alone, watches Ingresses, Services, EndpointSlices, pods and nodes,
    makes an Ingress's Certificate, writes its status and keeps its claim's date; and for the
    Gateway API (its CRDs installed by hack/cluster.sh), writes the statuses of a GatewayClass,
    a Gateway and HTTPRoutes (one accepted, one from a namespace the listener does not allow),
    TLS, gRPC, TCP and UDP routes, and makes the Certificate the Gateway gives."""
    tmp_path = tmp_path_factory.mktemp("chart-ingress")
    with chart_operator(kube, helm, tmp_path, everywhere=True) as installed:
        apps, system = installed.apps, installed.system
        external, _ = installed.gateways
        gateways = Objects(kube, apps, GATEWAY)
        host = f"{unique_name('ing')}.example.com"
        try:
            gateways.create(external, {"mode": "External", "publicIP": "203.0.113.11"})
            gateways.ready(external)
            manifest = {"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                 "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}},
                {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                 "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
                 "endpoints": [{"addresses": ["192.0.2.10"]}]},
                {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                 "metadata": {"name": "site"},
                 "spec": {"ingressClassName": "kakuremichi", "rules": [{"host": host, "http": {
                     "paths": [{"path": "/", "pathType": "Prefix", "backend": {
                         "service": {"name": "web", "port": {"number": 80}}}}]}}]}},
            ]}  # fmt: skip
            kube.kubectl("apply", "-n", apps, "-f", "-", input_text=json.dumps(manifest))

            def certificate() -> dict[str, Any] | None:
                listed = json.loads(kube.kubectl("get", "certificates.kakuremichi.io", "-n", apps,
                                                 "-o", "json"))["items"]  # fmt: skip
                return next((c for c in listed if c["spec"]["domain"] == host), None)

            made: dict[str, Any] = wait_until(certificate, "the host's Certificate")
            (owner,) = made["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"]) == ("Ingress", "site")
            balancer = "jsonpath={.status.loadBalancer.ingress[*].ip}"
            wait_until(
                lambda: (
                    kube.kubectl("get", "ingress", "site", "-n", apps, "-o", balancer)
                    == "203.0.113.11"
                ),
                "the Ingress's status to name the gateway",
            )
            dates = CLAIMS_CONFIG_MAP
            stored = json.loads(kube.kubectl("get", "configmap", dates, "-n", system, "-o", "json"))
            assert len(stored["data"]) == 1
            kube.kubectl("delete", "ingress", "site", "-n", apps)
            wait_until(
                lambda: (
                    not json.loads(
                        kube.kubectl("get", "configmap", dates, "-n", system, "-o", "json")
                    ).get("data")
                ),
                "the Ingress's claim to be forgotten",
            )
            gateway_api(kube, apps, f"{unique_name('rt')}.example.com", "203.0.113.11")
        finally:
            gateways.delete_all()
        trouble = rbac_trouble(installed.operator)
        assert not trouble, f"the operator hit RBAC limits:\n{trouble}"


def gateway_api(kube: Cluster, apps: str, host: str, address: str) -> None:
    """A GatewayClass of ours, a Gateway and two HTTPRoutes, served (or refused) as the spec
    says, through the API server's own Gateway API CRDs."""
    klass, outsider = unique_name("kmgc"), unique_name("kmhout")
    kube.kubectl("create", "namespace", outsider)
    gateway_class = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                     "metadata": {"name": klass},
                     "spec": {"controllerName": GATEWAY_CONTROLLER}}  # fmt: skip
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": apps},
        "spec": {"gatewayClassName": klass, "listeners": [
            {"name": "https", "protocol": "HTTPS", "port": 443,
             "tls": {"certificateRefs": [{"name": "edge-cert"}]}},
            {"name": "http", "protocol": "HTTP", "port": 80},
            {"name": "tls", "protocol": "TLS", "port": 443, "hostname": f"vault.{host}",
             "tls": {"mode": "Passthrough"}},
            {"name": "pg", "protocol": "TCP", "port": 15432},
            {"name": "dns", "protocol": "UDP", "port": 15353},
        ]},
    }  # fmt: skip
    dns_service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": apps},
        "spec": {"ports": [{"port": 53, "protocol": "UDP"}]},
    }  # fmt: skip

    def port_route(kind: str, name: str, backend: str, port: int) -> dict[str, Any]:
        return {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": apps},
            "spec": {"parentRefs": [{"name": "edge", "sectionName": name}],
                     "rules": [{"backendRefs": [{"name": backend, "port": port}]}]},
        }  # fmt: skip

    tls_route = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "TLSRoute",
        "metadata": {"name": "vault", "namespace": apps},
        "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [f"vault.{host}"],
                 "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
    }  # fmt: skip

    def route(namespace: str) -> dict[str, Any]:
        return {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "site", "namespace": namespace},
            "spec": {
                "parentRefs": [{"name": "edge", "namespace": apps, "sectionName": "https"}],
                "hostnames": [host],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
            },
        }  # fmt: skip

    grpc_route = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "rpc", "namespace": apps},
        "spec": {"parentRefs": [{"name": "edge", "sectionName": "https"}],
                 "hostnames": [f"rpc.{host}"],
                 "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
    }  # fmt: skip
    far_service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "far", "namespace": outsider},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    }  # fmt: skip
    cross = route(apps)
    cross["metadata"]["name"] = "cross"
    cross["spec"]["hostnames"] = [f"cross.{host}"]
    cross["spec"]["rules"] = [{"backendRefs": [{"name": "far", "namespace": outsider,
                                                "port": 80}]}]  # fmt: skip
    grant = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "let-apps", "namespace": outsider},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                           "namespace": apps}],
                 "to": [{"group": "", "kind": "Service"}]},
    }  # fmt: skip
    # An older Tunnel of the other namespace holds a host; the HTTPRoute naming it is told so.
    held = {
        "apiVersion": "kakuremichi.io/v1alpha1", "kind": "Tunnel",
        "metadata": {"name": "held", "namespace": outsider},
        "spec": {"domain": f"held.{host}", "agent": "nobody", "target": "localhost:8080"},
    }  # fmt: skip
    clash = route(apps)
    clash["metadata"]["name"] = "clash"
    clash["spec"]["hostnames"] = [f"held.{host}"]
    items = [gateway_class, gateway, route(apps), route(outsider), tls_route, grpc_route,
             dns_service, port_route("TCPRoute", "pg", "web", 80),
             port_route("UDPRoute", "dns", "dns", 53), far_service, cross]  # fmt: skip
    document = {"apiVersion": "v1", "kind": "List", "items": items}
    try:
        kube.kubectl("apply", "-f", "-", input_text=json.dumps(document))

        def parent(namespace: str, kind: str = "httproutes", name: str = "site"
                   ) -> dict[str, tuple[str, str]]:  # fmt: skip
            found = json.loads(kube.kubectl("get", f"{kind}.gateway.networking.k8s.io", name,
                                            "-n", namespace, "-o", "json"))  # fmt: skip
            parents = (found.get("status") or {}).get("parents") or [{}]
            return {c["type"]: (c["status"], c["reason"]) for c in parents[0].get("conditions", ())}

        wait_until(lambda: parent(apps).get("Accepted") == ("True", "Accepted"),
                   "the HTTPRoute to be accepted")  # fmt: skip
        assert parent(apps)["ResolvedRefs"] == ("True", "ResolvedRefs")
        wait_until(lambda: parent(apps, "tlsroutes", "vault").get("Accepted") == (
            "True", "Accepted"), "the TLSRoute to be accepted")  # fmt: skip
        wait_until(lambda: parent(apps, "grpcroutes", "rpc").get("Accepted") == (
            "True", "Accepted"), "the GRPCRoute to be accepted")  # fmt: skip
        for kind, name in (("tcproutes", "pg"), ("udproutes", "dns")):
            wait_until(lambda kind=kind, name=name: parent(apps, kind, name) == {  # type: ignore[misc]
                "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs"),
            }, f"the {kind} to be accepted")  # fmt: skip
        wait_until(lambda: parent(outsider).get("Accepted") == ("False", "NotAllowedByListeners"),
                   "the other namespace's HTTPRoute to be refused")  # fmt: skip
        # A Service of another namespace: refused until a ReferenceGrant there allows it.
        wait_until(lambda: parent(apps, name="cross").get("ResolvedRefs") == (
            "False", "RefNotPermitted"), "the cross-namespace backend to be refused")  # fmt: skip
        kube.kubectl("apply", "-f", "-", input_text=json.dumps(grant))
        wait_until(lambda: parent(apps, name="cross").get("ResolvedRefs") == (
            "True", "ResolvedRefs"), "the granted backend to resolve")  # fmt: skip
        kube.kubectl("apply", "-f", "-", input_text=json.dumps(held))
        time.sleep(1.1)  # (claims date from the second: the Tunnel's is older)
        kube.kubectl("apply", "-f", "-", input_text=json.dumps(clash))

        def clash_events() -> str:
            return kube.kubectl("get", "events", "-n", apps, "--field-selector",
                                "involvedObject.name=clash", "-o",
                                "jsonpath={.items[*].reason}")  # fmt: skip

        wait_until(lambda: "DomainConflict" in clash_events(),
                   "the HTTPRoute on the Tunnel's host to be told DomainConflict")  # fmt: skip
        assert parent(apps, name="clash").get("Accepted") == ("True", "Accepted")

        def gateway_status() -> dict[str, Any]:
            found = json.loads(kube.kubectl("get", "gateways.gateway.networking.k8s.io", "edge",
                                            "-n", apps, "-o", "json"))  # fmt: skip
            status: dict[str, Any] = found.get("status") or {}
            return status

        wait_until(lambda: gateway_status().get("addresses") == [
            {"type": "IPAddress", "value": address}], "the Gateway to be programmed")  # fmt: skip
        listeners = {item["name"]: item for item in gateway_status()["listeners"]}
        # (the HTTPRoutes site, cross and clash, and the GRPCRoute)
        assert listeners["https"]["attachedRoutes"] == 4
        accepted = json.loads(
            kube.kubectl("get", "gatewayclasses.gateway.networking.k8s.io", klass, "-o", "json")
        )["status"]["conditions"]
        assert [(c["type"], c["status"]) for c in accepted] == [("Accepted", "True")]
        listed = json.loads(kube.kubectl("get", "certificates.kakuremichi.io", "-n", apps, "-o",
                                         "json"))["items"]  # fmt: skip
        (made,) = [c for c in listed if c["spec"]["domain"] == host]
        assert made["spec"]["secretName"] == "edge-cert"
        (owner,) = made["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("Gateway", "edge")
    finally:
        extra = {"apiVersion": "v1", "kind": "List", "items": [grant, held, clash]}
        kube.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false",
                     input_text=json.dumps(extra))  # fmt: skip
        kube.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false",
                     input_text=json.dumps(document))  # fmt: skip
        kube.kubectl("delete", "namespace", outsider, "--wait=false")
