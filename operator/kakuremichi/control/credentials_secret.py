"""The Secret that holds an edge's API key and WireGuard private key: created once, then always
read back, so neither a restart nor a repeated reconcile rotates an edge's identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from kakuremichi.control.credentials import (
    ApiKeyRole,
    generate_api_key,
    generate_wireguard_keypair,
    is_wireguard_key,
)
from kakuremichi.control.kube_api import KubeApi

API_KEY = "apiKey"
PRIVATE_KEY = "wireguardPrivateKey"
PUBLIC_KEY = "wireguardPublicKey"


async def ensure_credentials(
    kube: KubeApi,
    namespace: str,
    secret_name: str,
    role: ApiKeyRole,
    owner: Mapping[str, Any],
    labels: Mapping[str, str],
) -> tuple[str, str]:
    """The API key and WireGuard private key kept in ``namespace/secret_name``."""
    data = await kube.read_secret(namespace, secret_name)
    if data is None:
        keypair = generate_wireguard_keypair()
        await kube.create_secret(
            namespace,
            secret_name,
            {
                API_KEY: generate_api_key(role),
                PRIVATE_KEY: keypair.private_key,
                PUBLIC_KEY: keypair.public_key,
            },
            owner=owner,
            labels={"app.kubernetes.io/managed-by": "kakuremichi", **labels},
        )
        # Read back what is stored: if another reconcile won the race, its keys count.
        data = await kube.read_secret(namespace, secret_name)
    if data is None or not data.get(API_KEY) or not is_wireguard_key(data.get(PRIVATE_KEY, "")):
        raise kopf.TemporaryError(
            f"Secret {namespace}/{secret_name} lacks a valid {API_KEY} or {PRIVATE_KEY}", delay=10
        )
    return data[API_KEY], data[PRIVATE_KEY]
