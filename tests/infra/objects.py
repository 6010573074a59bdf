"""Custom objects and Secrets in one test namespace, with waits on their conditions."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import API_VERSION, GROUP, VERSION, ResourceKind
from tests.infra.cluster import Cluster
from tests.infra.polling import wait_until


class Objects:
    def __init__(self, kube: Cluster, namespace: str, kind: ResourceKind) -> None:
        self.custom = client.CustomObjectsApi(kube.api_client())
        self.namespace = namespace
        self.kind = kind
        self.created: set[str] = set()

    def create(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": self.kind.kind,
            "metadata": {"name": name},
        }
        if spec is not None:
            body["spec"] = spec
        created = self._call("create", body=body)
        self.created.add(name)
        assert isinstance(created, dict)
        return created

    def _call(self, verb: str, name: str | None = None, body: Any = None) -> Any:
        """One CustomObjectsApi call, namespaced or cluster-scoped as the kind is."""
        scope = "namespaced" if self.kind.namespaced else "cluster"
        method = getattr(self.custom, f"{verb}_{scope}_custom_object")
        args: list[Any] = [GROUP, VERSION]
        if self.kind.namespaced:
            args.append(self.namespace)
        args.append(self.kind.plural)
        if name is not None:
            args.append(name)
        if body is not None:
            args.append(body)
        return method(*args)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self._call("patch", name, body={"spec": spec})

    def delete(self, name: str) -> None:
        try:
            self._call("delete", name)
        except ApiException as error:
            if error.status != 404:
                raise
        self.created.discard(name)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            found = self._call("get", name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        assert isinstance(found, dict)
        return found

    def wait_past_creation(self, name: str) -> None:
        """Until the second after the object's creation: claims are ordered by creation time
        (whole seconds in Kubernetes), then uid, so an object made now is surely younger."""
        stamp = (self.get(name) or {})["metadata"]["creationTimestamp"]
        created = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        wait_until(lambda: datetime.now(UTC) >= created + timedelta(seconds=1), "the next second")

    def names(self) -> list[str]:
        listing = self._call("list")
        assert isinstance(listing, dict)
        return [item["metadata"]["name"] for item in listing["items"]]

    def condition(self, name: str) -> dict[str, Any] | None:
        found = self.get(name)
        conditions = ((found or {}).get("status") or {}).get("conditions", [])
        ready: dict[str, Any] | None = next((c for c in conditions if c["type"] == "Ready"), None)
        return ready

    def ready(
        self, name: str, status: str = "True", reason: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """Wait for Ready=status (and reason); return the object's status."""

        def probe() -> dict[str, Any] | None:
            ready = self.condition(name)
            if ready and ready["status"] == status and reason in (None, ready["reason"]):
                found = self.get(name)
                return found["status"] if found else None
            return None

        return wait_until(
            probe, f"{self.kind.kind} {name} Ready={status} {reason or ''}", timeout=timeout
        )

    def delete_all(self, timeout: float = 60) -> None:
        """Delete every object of this kind in the (test-owned) namespace and wait for it;
        of a cluster-scoped kind, only those this helper created."""
        owned = self.names() if self.kind.namespaced else list(self.created)
        for name in owned:
            self.delete(name)
        if not self.kind.namespaced:
            wait_until(lambda: not set(owned) & set(self.names()), "the test's objects to go")
            return
        wait_until(lambda: not self.names(), f"the test's {self.kind.plural} to go", timeout)


class Secrets:
    def __init__(self, kube: Cluster, namespace: str) -> None:
        self.core = client.CoreV1Api(kube.api_client())
        self.namespace = namespace

    def read(self, name: str) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def put_tls(self, name: str, chain: str, key: str) -> None:
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            type="kubernetes.io/tls",
            string_data={"tls.crt": chain, "tls.key": key},
        )
        try:
            self.core.create_namespaced_secret(self.namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.replace_namespaced_secret(name, self.namespace, body)

    def delete(self, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
