"""An in-memory cluster in place of the API server (``KubeApi``), for unit tests of the state,
the projectors and the reconcilers. It keeps objects, Secrets, Nodes, pods and Events as the API
server would for the calls the operator makes (status merged as a merge patch, owners and
labels on Secrets) and counts the writes, so a test can also say "this costs no API call". The
integration tier runs the same code against the real API server."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import API_VERSION, ResourceKind
from kakuremichi.control.kube_api import AnyKind, BuiltinKind, SecretNotOwned, StoredSecret
from kakuremichi.control.pod_identity import PodFacts, ReviewedToken

Key = tuple[str, str, str]
"""(plural, namespace, name); cluster-scoped objects have the namespace ""."""


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch (RFC 7386): nested maps merge, None removes."""
    for name, value in patch.items():
        if value is None:
            target.pop(name, None)
        elif isinstance(value, Mapping) and isinstance(target.get(name), dict):
            merge(target[name], value)
        else:
            target[name] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@dataclass
class FakeKube:
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], StoredSecret] = field(default_factory=dict)
    nodes: dict[str, tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)
    pods: dict[tuple[str, str], PodFacts] = field(default_factory=dict)
    tokens: dict[str, ReviewedToken] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    daemonsets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    service_accounts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[str, str, str, bool, str]] = field(default_factory=list)
    """(kind, namespace, name, warning, reason)."""
    messages: list[str] = field(default_factory=list)
    """Each Event's message, in the order of ``events``."""
    builtin: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Objects of kinds the operator does not define (Ingresses, Services…), by plural."""
    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    writes: list[tuple[str, Key]] = field(default_factory=list)
    """Every write, in order: (verb, what)."""
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- what a test sets up -----------------------------------------------------------------

    def add(self, kind: ResourceKind, name: str, spec: dict[str, Any], namespace: str = "",
            status: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """An object as the API server would return it once created."""
        body = {
            "apiVersion": API_VERSION,
            "kind": kind.kind,
            "metadata": {
                "name": name, "namespace": namespace or None, "uid": str(uuid.uuid4()),
                "generation": 1, "resourceVersion": str(next(self._versions)),
                "creationTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            },
            "spec": _copy(spec),
            "status": _copy(status or {}),
        }  # fmt: skip
        self.objects[(kind.plural, namespace if kind.namespaced else "", name)] = body
        return body

    def status_writes(self) -> int:
        return sum(1 for verb, _ in self.writes if verb == "status")

    # --- KubeApi --------------------------------------------------------------------------

    async def apply_daemonset(self, manifest: dict[str, Any]) -> str:
        meta = manifest["metadata"]
        key = (meta["namespace"], meta["name"])
        uid = (self.daemonsets.get(key) or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
        self.daemonsets[key] = {**manifest, "metadata": {**meta, "uid": uid}}
        self.writes.append(("daemonset", ("daemonsets", *key)))
        return str(uid)

    async def apply_service_account(self, manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        self.service_accounts[(meta["namespace"], meta["name"])] = manifest

    async def review_token(self, token: str, audience: str) -> ReviewedToken:
        found = self.tokens.get(token)
        if found is None or audience not in found.audiences:
            return ReviewedToken(False, error="invalid bearer token")
        return found

    async def pod_facts(self, namespace: str, name: str) -> PodFacts | None:
        return self.pods.get((namespace, name))

    async def node(self, name: str) -> tuple[dict[str, str], dict[str, str]] | None:
        return self.nodes.get(name)

    async def namespace_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(labels) for name, labels in self.namespaces.items()}

    async def post_event(
        self, kind: AnyKind, namespace: str, name: str, uid: str, warning: bool,
        reason: str, message: str,
    ) -> None:  # fmt: skip
        self.events.append((kind.kind, namespace, name, warning, reason))
        self.messages.append(message)

    async def announce(
        self, kind: AnyKind, body: Mapping[str, Any], warning: bool, reason: str, message: str
    ) -> None:
        meta = body.get("metadata") or {}
        await self.post_event(
            kind, meta.get("namespace") or "", meta.get("name") or "", meta.get("uid") or "",
            warning, reason, message,
        )  # fmt: skip

    async def live_pods(self, namespace: str, label_selector: str) -> list[str]:
        return [
            name for (ns, name), pod in self.pods.items() if ns == namespace and not pod.deleting
        ]

    async def read_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> dict[str, str] | None:
        stored = self.secrets.get((namespace, name))
        return None if stored is None else dict(stored.data)

    async def stored_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> StoredSecret | None:
        return self.secrets.get((namespace, name))

    def forget_secret(self, namespace: str, name: str) -> None:
        pass

    def _store(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str],
        owners: frozenset[str], uid: str = "",
    ) -> None:  # fmt: skip
        self.secrets[(namespace, name)] = StoredSecret(
            dict(data), dict(labels), owners, uid or str(uuid.uuid4()), str(next(self._versions))
        )
        self.writes.append(("secret", ("secrets", namespace, name)))

    async def create_secret(
        self, namespace: str, name: str, data: Mapping[str, str],
        owner: Mapping[str, Any] | None, labels: Mapping[str, str], kind: str = "Opaque",
    ) -> bool:  # fmt: skip
        if (namespace, name) in self.secrets:
            return False
        owners = frozenset([owner["metadata"]["uid"]]) if owner is not None else frozenset()
        self._store(namespace, name, data, labels, owners)
        return True

    async def put_tls_secret(
        self, namespace: str, name: str, chain: str, key: str, owner: Mapping[str, Any],
        labels: Mapping[str, str],
    ) -> None:  # fmt: skip
        data = {"tls.crt": chain, "tls.key": key}
        if await self.create_secret(namespace, name, data, owner, labels, "kubernetes.io/tls"):
            return
        existing = self.secrets[(namespace, name)]
        if not existing.owned_by(owner["metadata"]["uid"]):
            raise SecretNotOwned(namespace, name)
        self._store(namespace, name, data, existing.labels, existing.owners, existing.uid)

    async def write_secret(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None:
        self._store(namespace, name, data, labels, frozenset())

    async def delete_secret(
        self, namespace: str, name: str, *, owner_uid: str | None = None
    ) -> None:
        existing = self.secrets.get((namespace, name))
        if existing is None or (owner_uid is not None and not existing.owned_by(owner_uid)):
            return
        del self.secrets[(namespace, name)]
        self.writes.append(("delete", ("secrets", namespace, name)))

    def _key(self, kind: ResourceKind, namespace: str, name: str) -> Key:
        return (kind.plural, namespace if kind.namespaced else "", name)

    async def get_object(
        self, kind: ResourceKind, namespace: str, name: str
    ) -> dict[str, Any] | None:
        found = self.objects.get(self._key(kind, namespace, name))
        return None if found is None else _copy(found)

    async def create_object(self, kind: ResourceKind, namespace: str, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if self._key(kind, namespace, name) in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        made = self.add(kind, name, body.get("spec") or {}, namespace)
        made["metadata"].update(
            {
                k: v
                for k, v in body["metadata"].items()
                if k in ("labels", "annotations", "ownerReferences")
            }
        )
        self.writes.append(("create", self._key(kind, namespace, name)))

    async def patch_object(
        self, kind: ResourceKind, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        found = self.objects[self._key(kind, namespace, name)]
        merge(found, patch)
        if "spec" in patch:
            found["metadata"]["generation"] += 1
        self.writes.append(("patch", self._key(kind, namespace, name)))

    async def delete_object(self, kind: ResourceKind, namespace: str, name: str) -> None:
        if self.objects.pop(self._key(kind, namespace, name), None) is not None:
            self.writes.append(("delete", self._key(kind, namespace, name)))

    async def patch_status(
        self, kind: ResourceKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        found = self.objects.get(self._key(kind, namespace, name))
        if found is None:
            return False
        merge(found.setdefault("status", {}), status)
        found["metadata"]["resourceVersion"] = str(next(self._versions))
        self.writes.append(("status", self._key(kind, namespace, name)))
        return True

    async def list_objects(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        return [item async for page in self.pages(kind, namespaces) for item in page]

    async def pages(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> AsyncIterator[list[dict[str, Any]]]:
        yield [
            _copy(body)
            for (plural, namespace, _), body in sorted(self.objects.items())
            if plural == kind.plural and (not namespaces or namespace in namespaces)
        ]

    def put_builtin(self, kind: BuiltinKind, body: dict[str, Any]) -> dict[str, Any]:
        """An object of a kind the operator only reads, as the API server would return it."""
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", datetime.now(UTC).isoformat().replace("+00:00", "Z"))
        meta["resourceVersion"] = str(next(self._versions))
        body.setdefault("apiVersion", kind.api_version)
        body.setdefault("kind", kind.kind)
        namespace = meta.get("namespace") or "" if kind.namespaced else ""
        self.builtin[(kind.plural, namespace, meta["name"])] = body
        return body

    async def list_builtin(
        self, kind: BuiltinKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        return [
            _copy(body)
            for (plural, namespace, _), body in sorted(self.builtin.items())
            if plural == kind.plural and (not namespaces or namespace in namespaces)
        ]

    async def edit_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str,
        edit: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any] | None:  # fmt: skip
        found = self.builtin.get((kind.plural, namespace if kind.namespaced else "", name))
        if found is None:
            return None
        status = edit(_copy(found.get("status") or {}))
        found["status"] = _copy(status)
        self.writes.append(("status", (kind.plural, namespace, name)))
        return status

    async def patch_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        found = self.builtin.get((kind.plural, namespace if kind.namespaced else "", name))
        if found is None:
            return False
        merge(found.setdefault("status", {}), status)
        self.writes.append(("status", (kind.plural, namespace, name)))
        return True

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        found = self.config_maps.get((namespace, name))
        return None if found is None else dict(found)

    async def write_config_map(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None:
        self.config_maps[(namespace, name)] = dict(data)
        self.writes.append(("configmap", ("configmaps", namespace, name)))
