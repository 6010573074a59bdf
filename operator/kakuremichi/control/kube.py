"""Kubernetes API calls the reconcilers make beyond what kopf does for them.

The official client is synchronous, so every call runs in a worker thread and the operator's
event loop never blocks on the network. The calls have threads (and pooled connections) of their
own, so a burst of them is neither capped by the loop's small default pool nor queued behind
other blocking work (the mirror's writes, ACME).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import GROUP, VERSION, ResourceKind
from kakuremichi.control.kube_api import AnyKind, BuiltinKind, SecretNotOwned, StoredSecret
from kakuremichi.control.pod_identity import PodFacts, ReviewedToken

T = TypeVar("T")
log = logging.getLogger(__name__)
CONCURRENT_CALLS = 16
"""Kubernetes calls in flight at once (worker threads, and pooled connections to match)."""
LIST_PAGE_SIZE = 500
STATUS_EDIT_ATTEMPTS = 3
"""Reads and writes of a status that others write too, before giving up until the next pass."""
REQUEST_TIMEOUT_SECONDS = (5.0, 30.0)
"""Connect and read deadlines of every call: a hung API server (a stopped process, a lost
route) fails the call, which its caller retries, instead of holding a worker thread until it
answers (16 threads are all the operator's calls have)."""
PROOF_TIMEOUT_SECONDS = (2.0, 3.0)
"""A gateway pod's proof (token review, pod read) is given up on after 5 s: its thread must
not outlive that by much, or pods retrying through an outage would hold every thread."""
SECRET_CACHE_SECONDS = 5.0
"""How long a read of a Secret may be served again to ``read_secret(..., cached=True)``
(writes made here and :meth:`Kube.forget_secret`, called on the Secret's watch events, end it
sooner)."""


def load_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = CONCURRENT_CALLS
    return client.ApiClient(configuration)


class Kube:
    """The :class:`~kakuremichi.control.kube_api.KubeApi` of a real API server."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authentication = client.AuthenticationV1Api(api)
        self._threads = ThreadPoolExecutor(CONCURRENT_CALLS, thread_name_prefix="kube")
        self._secrets: dict[tuple[str, str], tuple[float, asyncio.Future[StoredSecret | None]]]
        self._secrets = {}

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in one of the Kubernetes worker threads, within the
        call deadlines."""
        loop = asyncio.get_running_loop()
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_SECONDS)
        return await loop.run_in_executor(
            self._threads, functools.partial(function, *args, **kwargs)
        )

    async def apply_daemonset(self, manifest: dict[str, Any]) -> str:
        """Create the DaemonSet, or replace it whole (so removed selectors and tolerations go).
        Returns its uid."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            existing = await self._call(self.apps.read_namespaced_daemon_set, name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            made = await self._call(
                self.apps.create_namespaced_daemon_set, namespace, cast(Any, manifest)
            )
            assert made.metadata is not None
            return str(made.metadata.uid)
        assert existing.metadata is not None
        body = {
            **manifest,
            "metadata": {
                **manifest["metadata"],
                "resourceVersion": existing.metadata.resource_version,
            },
        }
        await self._call(self.apps.replace_namespaced_daemon_set, name, namespace, cast(Any, body))
        return str(existing.metadata.uid)

    async def apply_service_account(self, manifest: dict[str, Any]) -> None:
        """Create the ServiceAccount, or replace it whole: one left by an earlier object of the
        same name is taken over (its owner reference replaced), not left to the garbage
        collector while the new pods need it."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            existing = await self._call(self.core.read_namespaced_service_account, name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            await self._call(
                self.core.create_namespaced_service_account, namespace, cast(Any, manifest)
            )
            return
        assert existing.metadata is not None
        body = {
            **manifest,
            "metadata": {
                **manifest["metadata"],
                "resourceVersion": existing.metadata.resource_version,
            },
        }
        await self._call(
            self.core.replace_namespaced_service_account, name, namespace, cast(Any, body)
        )

    async def review_token(self, token: str, audience: str) -> ReviewedToken:
        """The API server's verdict on a ServiceAccount token (TokenReview)."""
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[audience])
        )
        answer = await self._call(
            self.authentication.create_token_review, review, _request_timeout=PROOF_TIMEOUT_SECONDS
        )
        status = answer.status
        if status is None or not status.authenticated or status.user is None:
            return ReviewedToken(False, error=(status.error if status else None) or "")
        user = status.user
        return ReviewedToken(
            True,
            username=user.username or "",
            audiences=tuple(status.audiences or ()),
            extra={k: tuple(v or ()) for k, v in (user.extra or {}).items()},
        )

    async def pod_facts(self, namespace: str, name: str) -> PodFacts | None:
        """The Pod, as :mod:`pod_identity` judges it; None when it does not exist."""
        try:
            pod = await self._call(
                self.core.read_namespaced_pod, name, namespace,
                _request_timeout=PROOF_TIMEOUT_SECONDS,
            )  # fmt: skip
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        meta, spec = pod.metadata, pod.spec
        assert meta is not None
        controller = next((o for o in (meta.owner_references or []) if o.controller), None)
        return PodFacts(
            name=meta.name or "",
            uid=meta.uid or "",
            node_name=(spec.node_name if spec else None) or "",
            service_account=(spec.service_account_name if spec else None) or "",
            controller_kind=controller.kind if controller else "",
            controller_uid=controller.uid if controller else "",
            deleting=meta.deletion_timestamp is not None,
        )

    async def node(self, name: str) -> tuple[dict[str, str], dict[str, str]] | None:
        """A Node's addresses by type (ExternalIP, InternalIP, ...) and its labels; None when
        it is gone."""
        try:
            node = await self._call(self.core.read_node, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        addresses = (node.status.addresses if node.status else None) or []
        found: dict[str, str] = {}
        for address in addresses:
            found.setdefault(address.type, address.address)
        labels = (node.metadata.labels if node.metadata else None) or {}
        return found, dict(labels)

    async def namespace_labels(self) -> dict[str, dict[str, str]]:
        """Every namespace's labels (TenantPolicies select namespaces by them)."""
        found: dict[str, dict[str, str]] = {}
        token: str | None = None
        while True:
            options: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                options["_continue"] = token
            page = await self._call(self.core.list_namespace, **options)
            for namespace in page.items:
                meta = namespace.metadata
                if meta is not None and meta.name:
                    found[meta.name] = dict(meta.labels or {})
            token = page.metadata._continue if page.metadata else None
            if not token:
                return found

    async def post_event(
        self,
        kind: AnyKind,
        namespace: str,
        name: str,
        uid: str,
        warning: bool,
        reason: str,
        message: str,
    ) -> None:
        """A Kubernetes Event on a custom object (what ``kubectl describe`` shows)."""
        now = datetime.now(UTC)
        where = namespace or "default"  # (cluster-scoped objects' Events, as kopf posts them)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=where),
            involved_object=client.V1ObjectReference(
                api_version=kind.api_version,
                kind=kind.kind,
                name=name,
                namespace=namespace or None,
                uid=uid,
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="kakuremichi"),
            reporting_component="kakuremichi.io/operator",
            reporting_instance="kakuremichi-operator",
        )
        await self._call(self.core.create_namespaced_event, where, event)

    async def announce(
        self, kind: AnyKind, body: Mapping[str, Any], warning: bool, reason: str, message: str
    ) -> None:
        """An Event on ``body`` (a whole object); a failure costs a log line, nothing more.
        Unlike kopf's event posting, this works outside kopf's handlers too (the tasks that
        reconcile objects again: re-admission, Secret rechecks, expiry)."""
        meta = body.get("metadata") or {}
        try:
            await self.post_event(
                kind, meta.get("namespace") or "", meta.get("name") or "", meta.get("uid") or "",
                warning, reason, message,
            )  # fmt: skip
        except Exception as error:
            log.warning("could not post an Event on %s %s: %s", kind.kind, meta.get("name"), error)

    async def live_pods(self, namespace: str, label_selector: str) -> list[str]:
        """Names of Pods matching the selector that are not finished or being deleted."""
        pods = await self._call(
            self.core.list_namespaced_pod, namespace, label_selector=label_selector
        )
        return [
            pod.metadata.name or ""
            for pod in pods.items
            if pod.metadata
            and pod.metadata.deletion_timestamp is None
            and (pod.status.phase if pod.status else None) not in ("Succeeded", "Failed")
        ]

    async def read_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> dict[str, str] | None:
        """The Secret's data, decoded; None when it does not exist (see :meth:`stored_secret`)."""
        stored = await self.stored_secret(namespace, name, cached=cached)
        return None if stored is None else dict(stored.data)

    async def stored_secret(
        self, namespace: str, name: str, *, cached: bool = False
    ) -> StoredSecret | None:
        """The Secret with its owners and labels; None when it does not exist.

        ``cached``: a read made (or in flight) less than :data:`SECRET_CACHE_SECONDS` ago may
        answer, so thousands of Certificates that share one Secret read it once, not once each.
        """
        if not cached:
            return await self._read_secret(namespace, name)
        key, now = (namespace, name), time.monotonic()
        entry = self._secrets.get(key)
        if entry is None or entry[0] <= now:
            if len(self._secrets) > 256:
                self._secrets = {k: e for k, e in self._secrets.items() if e[0] > now}
            entry = (now + SECRET_CACHE_SECONDS, asyncio.ensure_future(self._read_secret(*key)))
            self._secrets[key] = entry
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self._secrets.get(key) is entry:
                del self._secrets[key]
            raise

    async def _secret_write(
        self, namespace: str, name: str, function: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """A call that changes the Secret ``namespace/name``; cached reads of it end."""
        try:
            return await self._call(function, *args, **kwargs)
        finally:
            self.forget_secret(namespace, name)

    def forget_secret(self, namespace: str, name: str) -> None:
        """The Secret changed: the next cached read asks the API server again."""
        self._secrets.pop((namespace, name), None)

    async def _read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        # Text values only: a Secret may also hold binary keystores nobody here reads.
        decoded = {}
        for key, value in (secret.data or {}).items():
            with contextlib.suppress(UnicodeDecodeError):
                decoded[key] = base64.b64decode(value).decode()
        meta = secret.metadata or client.V1ObjectMeta()
        return StoredSecret(
            data=decoded,
            labels=dict(meta.labels or {}),
            owners=frozenset(o.uid for o in meta.owner_references or ()),
            uid=meta.uid or "",
            resource_version=meta.resource_version or "",
        )

    async def create_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        owner: Mapping[str, Any] | None,
        labels: Mapping[str, str],
        kind: str = "Opaque",
    ) -> bool:
        """Create the Secret owned by ``owner`` (None: by nobody, it stays); False when it
        already exists."""
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels=dict(labels),
                owner_references=[_owner_reference(owner)] if owner is not None else None,
            ),
            type=kind,
            string_data=dict(data),
        )
        try:
            await self._secret_write(
                namespace, name, self.core.create_namespaced_secret, namespace, body
            )
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def put_tls_secret(
        self,
        namespace: str,
        name: str,
        chain: str,
        key: str,
        owner: Mapping[str, Any],
        labels: Mapping[str, str],
    ) -> None:
        """Write a ``kubernetes.io/tls`` Secret that ``owner`` owns: created owned by it (so it
        goes with it), or updated when it is already ``owner``'s. Any other Secret of that
        name is left untouched: :class:`SecretNotOwned`."""
        data = {"tls.crt": chain, "tls.key": key}
        if await self.create_secret(namespace, name, data, owner, labels, kind="kubernetes.io/tls"):
            return
        existing = await self._read_secret(namespace, name)
        uid = owner["metadata"]["uid"]
        if existing is None or not existing.owned_by(uid):
            raise SecretNotOwned(namespace, name)
        # The resourceVersion makes the write conditional on the Secret read just now.
        patch = {"metadata": {"resourceVersion": existing.resource_version}, "stringData": data}
        await self._secret_write(
            namespace, name, self.core.patch_namespaced_secret, name, namespace, patch
        )

    async def write_secret(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None:
        """Create or update an Opaque Secret that belongs to no object."""
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)),
            type="Opaque",
            string_data=dict(data),
        )
        try:
            await self._secret_write(
                namespace, name, self.core.create_namespaced_secret, namespace, body
            )
        except ApiException as error:
            if error.status != 409:
                raise
            await self._secret_write(
                namespace, name, self.core.replace_namespaced_secret, name, namespace, body
            )

    async def delete_secret(
        self, namespace: str, name: str, *, owner_uid: str | None = None
    ) -> None:
        """Delete the Secret; with ``owner_uid``, only when that object owns it (someone
        else's Secret of the same name stays)."""
        options = None
        if owner_uid is not None:
            existing = await self._read_secret(namespace, name)
            if existing is None or not existing.owned_by(owner_uid):
                return
            options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=existing.uid))
        try:
            await self._secret_write(
                namespace, name, self.core.delete_namespaced_secret, name, namespace,
                body=options,
            )  # fmt: skip
        except ApiException as error:
            if error.status not in (404, 409):  # (409: replaced since it was read)
                raise

    async def get_object(
        self, kind: ResourceKind, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            found = await self._call(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                kind.plural,
                name,
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        assert isinstance(found, dict)
        return found

    async def create_object(self, kind: ResourceKind, namespace: str, body: dict[str, Any]) -> None:
        await self._call(
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            kind.plural,
            body,
        )

    async def patch_object(
        self, kind: ResourceKind, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        await self._call(
            self.custom.patch_namespaced_custom_object,
            GROUP, VERSION, namespace, kind.plural, name, patch,
        )  # fmt: skip

    async def delete_object(self, kind: ResourceKind, namespace: str, name: str) -> None:
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                GROUP, VERSION, namespace, kind.plural, name,
            )  # fmt: skip
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_status(
        self, kind: ResourceKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        """Merge ``status`` into the object's status; False when the object is gone."""
        return await self._patch_status(
            GROUP, VERSION, kind.plural, kind.namespaced, namespace, name, status
        )

    async def _patch_status(
        self, group: str, version: str, plural: str, namespaced: bool, namespace: str,
        name: str, status: dict[str, Any],
    ) -> bool:  # fmt: skip
        body = {"status": status}
        try:
            if namespaced:
                await self._call(
                    self.custom.patch_namespaced_custom_object_status,
                    group, version, namespace, plural, name, body,
                )  # fmt: skip
            else:
                await self._call(
                    self.custom.patch_cluster_custom_object_status,
                    group, version, plural, name, body,
                )  # fmt: skip
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def list_objects(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Every object of ``kind`` in ``namespaces`` (all when empty)."""
        return [item async for page in self.pages(kind, namespaces) for item in page]

    async def pages(
        self, kind: ResourceKind, namespaces: tuple[str, ...] = ()
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The objects of ``kind`` in ``namespaces`` (all when empty), a page at a time: at
        thousands of objects one whole listing is tens of MiB of Python objects."""
        async for page in self._custom_pages(GROUP, VERSION, kind.plural, kind.namespaced,
                                             namespaces):  # fmt: skip
            yield page

    async def _custom_pages(
        self, group: str, version: str, plural: str, namespaced: bool, namespaces: tuple[str, ...]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        scopes: tuple[str | None, ...] = namespaces if namespaced and namespaces else (None,)
        for namespace in scopes:
            token: str | None = None
            while True:
                options: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
                if token:
                    options["_continue"] = token
                if namespace is None:
                    listing = await self._call(
                        self.custom.list_cluster_custom_object, group, version, plural, **options
                    )
                else:
                    listing = await self._call(
                        self.custom.list_namespaced_custom_object,
                        group, version, namespace, plural, **options,
                    )  # fmt: skip
                yield _items(listing)
                assert isinstance(listing, dict)
                token = (listing.get("metadata") or {}).get("continue")
                if not token:
                    break

    async def list_builtin(
        self, kind: BuiltinKind, namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        if not kind.group:  # (the core group: the typed client, then plain dicts)
            scopes: tuple[str | None, ...] = (
                namespaces if kind.namespaced and namespaces else (None,)
            )
            return [item for namespace in scopes for item in await self._list_core(kind, namespace)]
        pages = self._custom_pages(kind.group, kind.version, kind.plural, kind.namespaced,
                                   namespaces)  # fmt: skip
        return [item async for page in pages for item in page]

    async def _list_core(self, kind: BuiltinKind, namespace: str | None) -> list[dict[str, Any]]:
        calls: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "services": (self.core.list_service_for_all_namespaces,
                         self.core.list_namespaced_service),
            "pods": (self.core.list_pod_for_all_namespaces, self.core.list_namespaced_pod),
            "nodes": (self.core.list_node, self.core.list_node),
            "namespaces": (self.core.list_namespace, self.core.list_namespace),
        }  # fmt: skip
        everywhere, one = calls[kind.plural]
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            options: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                options["_continue"] = token
            if namespace is None:
                listing = await self._call(everywhere, **options)
            else:
                listing = await self._call(one, namespace, **options)
            found.extend(self.core.api_client.sanitize_for_serialization(listing.items))
            token = listing.metadata._continue if listing.metadata else None
            if not token:
                return found

    async def patch_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str, status: dict[str, Any]
    ) -> bool:
        return await self._patch_status(
            kind.group, kind.version, kind.plural, kind.namespaced, namespace, name, status
        )

    async def edit_builtin_status(
        self, kind: BuiltinKind, namespace: str, name: str,
        edit: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any] | None:  # fmt: skip
        for attempt in range(STATUS_EDIT_ATTEMPTS):
            try:
                found = await self._call(
                    self.custom.get_namespaced_custom_object,
                    kind.group, kind.version, namespace, kind.plural, name,
                )  # fmt: skip
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            assert isinstance(found, dict)
            status = edit(dict(found.get("status") or {}))
            body = {**found, "status": status}
            try:
                await self._call(
                    self.custom.replace_namespaced_custom_object_status,
                    kind.group, kind.version, namespace, kind.plural, name, body,
                )  # fmt: skip
            except ApiException as error:
                if error.status == 404:
                    return None
                if error.status == 409 and attempt + 1 < STATUS_EDIT_ATTEMPTS:
                    continue  # (written meanwhile: read it again)
                raise
            return status
        return None

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            found = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found.data or {})

    async def write_config_map(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str]
    ) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)),
            data=dict(data),
        )
        try:
            await self._call(self.core.replace_namespaced_config_map, name, namespace, body)
        except ApiException as error:
            if error.status != 404:
                raise
            await self._call(self.core.create_namespaced_config_map, namespace, body)


def _items(listing: object) -> list[dict[str, Any]]:
    assert isinstance(listing, dict)
    items: list[dict[str, Any]] = listing["items"]
    return items


def _owner_reference(owner: Mapping[str, Any]) -> client.V1OwnerReference:
    """Owned objects go when ``owner`` goes (Kubernetes' garbage collector)."""
    return client.V1OwnerReference(
        api_version=owner["apiVersion"],
        kind=owner["kind"],
        name=owner["metadata"]["name"],
        uid=owner["metadata"]["uid"],
        controller=True,
        block_owner_deletion=True,
    )
