"""The ``kakuremichi`` command: one entry point, one subcommand per role or task.

Subcommands that start services (``operator``, ``gateway``, ``agent``) arrive with their
components; this module only parses arguments and hands over to the module that does the work.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kakuremichi import __version__
from kakuremichi.api import crd, protocol
from kakuremichi.api.fields import describe_errors
from kakuremichi.api.resources import API_VERSION, KINDS, ResourceKind
from kakuremichi.control.flags import add_flags
from kakuremichi.control.settings import ControlSettings

DEFAULT_DB_URL = "sqlite:///kakuremichi.db"


def _cmd_crds(args: argparse.Namespace) -> int:
    if args.check is not None:
        stale = crd.stale_files(Path(args.check))
        if stale:
            print(
                f"stale CRDs in {args.check}: {', '.join(stale)}; "
                f"run `kakuremichi crds --output-dir {args.check}`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check}: CRDs are up to date")
        return 0
    if args.output_dir is not None:
        for path in crd.write_all(Path(args.output_dir)):
            print(f"wrote {path}")
        return 0
    sys.stdout.write("---\n".join(crd.render_all().values()))
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from kakuremichi.control.store import current_revision, upgrade

    upgrade(args.db, args.revision)
    print(f"{args.db}: at revision {current_revision(args.db)}")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    from kakuremichi.control.store import current_revision

    print(current_revision(args.db) or "(empty database)")
    return 0


def _cmd_db_new_key(args: argparse.Namespace) -> int:
    from kakuremichi.control.store import Sealer

    encoded = base64.b64encode(Sealer.generate_key()).decode()
    if args.output is None:
        print(encoded)
        return 0
    path = Path(args.output)
    if path.exists():
        print(f"{path} exists; refusing to overwrite a sealing key", file=sys.stderr)
        return 1
    path.touch(mode=0o600)
    path.write_text(encoded + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Check manifests against the same models the operator uses, without a cluster."""
    by_kind = {kind.kind: kind for kind in KINDS}
    failures = 0
    for file_name in args.files:
        text = sys.stdin.read() if file_name == "-" else Path(file_name).read_text("utf-8")
        for number, document in enumerate(yaml.safe_load_all(text), start=1):
            if not isinstance(document, dict):
                continue
            failures += _validate_document(file_name, number, document, by_kind)
    return 1 if failures else 0


def _validate_document(
    file_name: str, number: int, document: dict[str, Any], by_kind: dict[str, ResourceKind]
) -> int:
    kind_name = document.get("kind")
    if document.get("apiVersion") != API_VERSION or kind_name not in by_kind:
        return 0
    kind = by_kind[kind_name]
    name = (document.get("metadata") or {}).get("name", "?")
    label = f"{file_name}#{number} {kind_name}/{name}"
    try:
        kind.model.model_validate({**document, "spec": document.get("spec") or {}})
    except ValidationError as error:
        for line in describe_errors(error):
            print(f"{label}: {line}", file=sys.stderr)
        return 1
    print(f"{label}: valid")
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kakuremichi.control import main as control_main
    from kakuremichi.control.flags import flag_errors, values_from
    from kakuremichi.control.installer import (
        EdgeWheelError,
        check_edge_wheel,
        default_edge_wheel,
        default_wheelhouse,
        default_wireguard_go,
    )
    from kakuremichi.control.settings import ControlSettings

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    values = values_from(args, ControlSettings)
    if args.all_namespaces and values.get("namespaces"):
        print("kakuremichi operator: --namespace and --all-namespaces exclude each other",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        wheel = values.get("edge_wheel")
        values["edge_wheel"] = check_edge_wheel(wheel) if wheel else default_edge_wheel()
    except EdgeWheelError as error:
        print(f"kakuremichi operator: --edge-wheel {error}", file=sys.stderr)
        return 2
    for flag, field, default in (
        ("--edge-wheelhouse", "edge_wheelhouse", default_wheelhouse),
        ("--edge-wireguard-go", "edge_wireguard_go", default_wireguard_go),
    ):
        given = values.get(field)
        if given is not None and not given.is_dir():
            print(f"kakuremichi operator: {flag} {given}: no such folder", file=sys.stderr)
            return 2
        values[field] = given or default()
    try:
        settings = ControlSettings(**values)
    except ValidationError as error:
        for line in flag_errors(error, ControlSettings):
            print(f"kakuremichi operator: {line}", file=sys.stderr)
        return 2
    if settings.edge_ca_file is not None and not settings.edge_ca_file.is_file():
        print(f"kakuremichi operator: --edge-ca-file {settings.edge_ca_file}: no such file",
              file=sys.stderr)  # fmt: skip
        return 2
    if settings.webhook_service:
        from kakuremichi.control.webhook import ServiceReference

        try:
            ServiceReference.parse(settings.webhook_service)
        except ValueError as error:
            print(f"kakuremichi operator: --webhook-service: {error}", file=sys.stderr)
            return 2
    try:
        asyncio.run(control_main.run(settings, liveness_endpoint=args.liveness))
    except control_main.SealingKeyConflict as error:
        print(f"kakuremichi operator: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_edge(args: argparse.Namespace) -> int:
    """``kakuremichi gateway`` and ``kakuremichi agent``."""
    import asyncio
    import logging

    from kakuremichi.edge.settings import (
        EdgeSettings,
        MissingApiKey,
        read_api_key,
        read_private_key,
    )

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    role = args.command
    try:
        api_key = read_api_key(args.api_key, args.api_key_file)
        extra = (
            {
                "node_name": args.node_name or None,
                "pod_token_file": args.pod_token_file,
                "listen_address": args.listen_address,
                "http_port": args.http_port,
                "https_port": args.https_port,
                "wireguard_port": args.wireguard_port,
                "workers": _worker_count(args.workers),
            }
            if role == "gateway"
            else {}
        )
        settings = EdgeSettings(
            control_url=args.control_url or "",
            api_key=api_key,
            ca_file=args.ca_file,
            ca_pem=os.environ.get("KAKUREMICHI_CONTROL_CA") or None,
            private_key_file=args.private_key_file,
            state_dir=args.state_dir,
            wireguard_interface=args.wireguard_interface or f"km{role}0",
            wireguard_mode=args.wireguard_mode,
            firewall=not args.no_firewall,
            metrics_listen=args.metrics_listen or None,
            **extra,
        )
    except MissingApiKey as error:
        print(f"kakuremichi {role}: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        for line in describe_errors(error):
            field, _, why = line.partition(": ")
            print(f"kakuremichi {role}: --{field.replace('_', '-')}: {why}", file=sys.stderr)
        return 2
    try:
        read_private_key(settings.private_key_file)
    except ValueError as error:
        print(f"kakuremichi {role}: {error}", file=sys.stderr)
        return 2
    from kakuremichi.edge.firewall import FirewallError
    from kakuremichi.edge.wireguard import WireGuardUnavailable

    if role == "gateway":
        from kakuremichi.edge.gateway import GatewayEdge

        edge: Any = GatewayEdge(settings)
    else:
        from kakuremichi.edge.agent import AgentEdge

        edge = AgentEdge(settings)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        run: Any = asyncio.run
    else:
        run = uvloop.run
    try:
        run(edge.run())
    except FirewallError as error:
        print(f"kakuremichi {role}: {error}", file=sys.stderr)
        return EXIT_NO_FIREWALL
    except WireGuardUnavailable as error:
        print(f"kakuremichi {role}: {error}", file=sys.stderr)
        return EXIT_NO_WIREGUARD
    return 0


EXIT_NO_FIREWALL = 3
"""The edge could not install its packet filter (and was not told --no-firewall)."""
EXIT_NO_WIREGUARD = protocol.EXIT_NO_WIREGUARD
"""This host has no usable WireGuard (no kernel module, no wireguard-go)."""


def _worker_count(value: str) -> int | str:
    """``auto``: one per CPU; a number is checked by the settings model (1..256)."""
    from kakuremichi.edge.worker_count import default_worker_count

    if value.strip().lower() == "auto":
        return default_worker_count()
    return value.strip()


def _env_path(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value) if value else None


def _add_edge_parser(commands: Any, role: str, help_text: str, metrics_port: int) -> None:
    edge = commands.add_parser(role, help=help_text)
    edge.add_argument(
        "--control-url", default=os.environ.get("KAKUREMICHI_CONTROL_URL"),
        help="control's URL, http(s)://HOST[:PORT] (or KAKUREMICHI_CONTROL_URL)",
    )  # fmt: skip
    keys = edge.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="the API key (or --api-key-file, KAKUREMICHI_API_KEY)")
    keys.add_argument("--api-key-file", type=Path, metavar="PATH", help="read the API key here")
    edge.add_argument(
        "--private-key-file", type=Path, metavar="PATH",
        help="WireGuard private key (default: the one control sends over TLS or loopback)",
    )  # fmt: skip
    edge.add_argument(
        "--ca-file", type=Path, metavar="PATH", default=_env_path("KAKUREMICHI_CA_FILE"),
        help="CA bundle to trust for an https control URL (besides the system's; or "
        "KAKUREMICHI_CA_FILE, or the PEM itself in KAKUREMICHI_CONTROL_CA)",
    )  # fmt: skip
    edge.add_argument(
        "--state-dir", type=Path, metavar="DIR", default=_env_path("KAKUREMICHI_STATE_DIR"),
        help="keep the last applied config here (mode 0600: it holds private keys), so that a "
        "restart serves it while control is unreachable (or KAKUREMICHI_STATE_DIR)",
    )  # fmt: skip
    edge.add_argument(
        "--wireguard-interface", metavar="NAME",
        help=f"WireGuard interface name: km and 1-13 of a-z, 0-9, - (default: km{role}0)",
    )  # fmt: skip
    edge.add_argument(
        "--wireguard-mode", choices=["auto", "kernel", "userspace"], default="auto",
        help="kernel WireGuard, wireguard-go, or the kernel when it has WireGuard (default)",
    )  # fmt: skip
    edge.add_argument(
        "--no-firewall", action="store_true",
        default=os.environ.get("KAKUREMICHI_NO_FIREWALL", "") not in ("", "0"),
        help="run without the nftables packet filter on the WireGuard interface (by default "
        "the edge installs it and refuses to start without it; or KAKUREMICHI_NO_FIREWALL=1)"
        + (": without it, agents may open connections to this host's listeners and to what "
           "it routes to" if role == "gateway" else
           "; the relay then also listens on every interface, still only for its gateways"),
    )  # fmt: skip
    edge.add_argument(
        "--metrics-listen", default=f"127.0.0.1:{metrics_port}", metavar="HOST:PORT",
        help=f"/metrics and /healthz (default 127.0.0.1:{metrics_port}; empty disables)",
    )  # fmt: skip
    if role == "gateway":
        edge.add_argument(
            "--node-name", metavar="NODE",
            help="in-cluster pods: the node, presented with the Gateway pool's key",
        )  # fmt: skip
        edge.add_argument(
            "--pod-token-file", type=Path, metavar="PATH",
            default=_env_path("KAKUREMICHI_POD_TOKEN_FILE"),
            help="in-cluster pods: the projected ServiceAccount token (audience kakuremichi) "
            "that proves the pod to control with --node-name (or KAKUREMICHI_POD_TOKEN_FILE)",
        )  # fmt: skip
        edge.add_argument(
            "--listen-address", metavar="ADDRESS", help="bind HTTP/HTTPS here (default: all)"
        )
        for port in ("http", "https", "wireguard"):
            edge.add_argument(
                f"--{port}-port", type=int, metavar="PORT",
                help=f"override the Gateway's {port} port",
            )  # fmt: skip
        edge.add_argument(
            "--workers", metavar="N", default=os.environ.get("KAKUREMICHI_WORKERS", "auto"),
            help="processes serving HTTPS: a number, or auto (default: one per CPU, within the "
            "pod's CPU limit and one per 128 MiB of its memory limit; or KAKUREMICHI_WORKERS)",
        )  # fmt: skip
    edge.add_argument("-v", "--verbose", action="store_true")
    edge.set_defaults(handler=_cmd_edge)


def _cmd_install_command(args: argparse.Namespace) -> int:
    """Print the one-liner that installs an Agent, or an External Gateway, on a host outside
    the cluster."""
    from kubernetes import client

    from kakuremichi.api.resources import GATEWAY, GROUP, VERSION
    from kakuremichi.control import agents
    from kakuremichi.control.gateway_instances import credentials_secret_name
    from kakuremichi.control.installer import one_liner, plain_http_warning
    from kakuremichi.control.kube import load_api_client

    api = load_api_client()
    role: str = args.role
    if role == "agent":
        what, namespace = f"Agent {args.namespace}/{args.name}", args.namespace
        secret_name = agents.credentials_secret_name(args.name)
    else:
        what, namespace = f"Gateway {args.name}", args.system_namespace
        secret_name = credentials_secret_name(args.name)
        try:
            gateway: Any = client.CustomObjectsApi(api).get_cluster_custom_object(
                GROUP, VERSION, GATEWAY.plural, args.name
            )
        except client.exceptions.ApiException as error:
            if error.status != 404:
                raise
            print(f"{what} does not exist", file=sys.stderr)
            return 1
        mode = (gateway.get("spec") or {}).get("mode")
        if mode != "External":
            print(
                f"{what} is {mode}: the operator runs its pods (a DaemonSet); the one-liner is "
                "for External gateways",
                file=sys.stderr,
            )
            return 1
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(secret_name, namespace)
    except client.exceptions.ApiException as error:
        if error.status != 404:
            raise
        print(
            f"{what} has no credentials yet (Secret {namespace}/{secret_name}): does it exist, "
            "and is the operator running?",
            file=sys.stderr,
        )
        return 1
    api_key = base64.b64decode((secret.data or {})["apiKey"]).decode()
    control_url = args.control_url.rstrip("/")
    if warning := plain_http_warning(control_url):
        print(f"kakuremichi {role}-command: warning: {warning}", file=sys.stderr)
    print(one_liner(role, control_url, api_key, args.ca_file))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kakuremichi",
        description="Self-hosted tunnels: publish services behind NAT on public domains.",
    )
    parser.add_argument("--version", action="version", version=f"kakuremichi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = commands.add_parser("crds", help="print or write the CustomResourceDefinitions")
    target = crds.add_mutually_exclusive_group()
    target.add_argument("--output-dir", metavar="DIR", help="write one YAML file per kind")
    target.add_argument("--check", metavar="DIR", help="fail if DIR's CRDs are stale")
    crds.set_defaults(handler=_cmd_crds)

    db = commands.add_parser("db", help="manage the SQLite mirror")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_upgrade = db_commands.add_parser("upgrade", help="create or migrate a database")
    db_upgrade.add_argument("--db", default=DEFAULT_DB_URL, help="database URL (sqlite:///PATH)")
    db_upgrade.add_argument("--revision", default="head", help="target revision")
    db_upgrade.set_defaults(handler=_cmd_db_upgrade)
    db_current = db_commands.add_parser("current", help="print the schema revision")
    db_current.add_argument("--db", default=DEFAULT_DB_URL, help="database URL (sqlite:///PATH)")
    db_current.set_defaults(handler=_cmd_db_current)
    db_key = db_commands.add_parser(
        "new-key", help="generate the key that seals secrets in the database"
    )
    db_key.add_argument("--output", metavar="PATH", help="write to PATH (mode 0600)")
    db_key.set_defaults(handler=_cmd_db_new_key)

    operator = commands.add_parser(
        "operator", help="run the control plane (reconcilers, SQLite mirror, control channel)"
    )
    add_flags(operator, ControlSettings)
    operator.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)"
    )
    operator.add_argument("--liveness", metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(handler=_cmd_operator)

    _add_edge_parser(
        commands, "gateway", "run a gateway: TLS by SNI, ACME answers, forwarding", 9470
    )
    _add_edge_parser(commands, "agent", "run an agent: relay tunnels to their targets", 9471)

    for role, kind in (("agent", "an Agent"), ("gateway", "an External Gateway")):
        install = commands.add_parser(
            f"{role}-command", help=f"print the one-line installer command for {kind}"
        )
        install.add_argument("name", help=f"the {role.capitalize()}'s name")
        if role == "agent":
            install.add_argument("-n", "--namespace", default="default")
        else:
            install.add_argument(
                "--system-namespace", metavar="NS",
                default=os.environ.get("KAKUREMICHI_SYSTEM_NAMESPACE")
                or os.environ.get("POD_NAMESPACE", "kakuremichi"),
                help="where the operator keeps Gateway credentials: the chart's namespace "
                "(KAKUREMICHI_SYSTEM_NAMESPACE, else the operator pod's, else kakuremichi)",
            )  # fmt: skip
        install.add_argument(
            "--control-url", default=os.environ.get("KAKUREMICHI_CONTROL_URL"), required=
            not os.environ.get("KAKUREMICHI_CONTROL_URL"),
            help="the control plane's public URL (or KAKUREMICHI_CONTROL_URL)",
        )  # fmt: skip
        install.add_argument(
            "--ca-file", metavar="PATH",
            help="the CA of a control URL signed by a private CA, as a path on the host: curl "
            "and the installer trust it, the service keeps a copy",
        )  # fmt: skip
        install.set_defaults(handler=_cmd_install_command, role=role)

    validate = commands.add_parser(
        "validate", help="check Agent/Gateway/Tunnel/Certificate manifests offline"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files, or - for stdin")
    validate.set_defaults(handler=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
