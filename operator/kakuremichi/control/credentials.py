"""Generated credentials: API keys and WireGuard keypairs.

API keys are the document's ``agt_``/``gtw_`` prefix plus 32 characters drawn from a CSPRNG
(62^32, about 190 bits). WireGuard keys are Curve25519, base64 encoded, byte-for-byte what
``wg genkey`` and ``wg pubkey`` produce: the private key is clamped before it is encoded.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import string
from dataclasses import dataclass
from typing import Literal

from nacl.bindings import crypto_scalarmult_base

ApiKeyRole = Literal["agent", "gateway"]

API_KEY_PREFIXES: dict[ApiKeyRole, str] = {"agent": "agt_", "gateway": "gtw_"}
API_KEY_RANDOM_LENGTH = 32
_ALPHABET = string.ascii_letters + string.digits


def generate_api_key(role: ApiKeyRole) -> str:
    random_part = "".join(secrets.choice(_ALPHABET) for _ in range(API_KEY_RANDOM_LENGTH))
    return API_KEY_PREFIXES[role] + random_part


def api_key_role(api_key: str) -> ApiKeyRole | None:
    """The role an API key's prefix claims, or None for a malformed key."""
    for role, prefix in API_KEY_PREFIXES.items():
        body = api_key[len(prefix) :]
        if (
            api_key.startswith(prefix)
            and len(body) == API_KEY_RANDOM_LENGTH
            and all(c in _ALPHABET for c in body)
        ):
            return role
    return None


def api_keys_equal(presented: str, expected: str) -> bool:
    """Constant-time comparison, so response timing reveals nothing about the key."""
    return hmac.compare_digest(presented.encode(), expected.encode())


@dataclass(frozen=True)
class WireGuardKeyPair:
    private_key: str
    public_key: str

    def __repr__(self) -> str:  # never print the private key by accident
        return f"WireGuardKeyPair(public_key={self.public_key!r})"


def _clamp(scalar: bytes) -> bytes:
    clamped = bytearray(scalar)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def _decode_key(key: str) -> bytes:
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raise ValueError("a WireGuard key must be base64") from None
    if len(raw) != 32:
        raise ValueError(f"a WireGuard key must be 32 bytes, got {len(raw)}")
    return raw


def wireguard_public_key(private_key: str) -> str:
    """The public key of a base64 private key, as ``wg pubkey`` computes it."""
    raw = _clamp(_decode_key(private_key))
    return base64.b64encode(crypto_scalarmult_base(raw)).decode()


def generate_wireguard_keypair() -> WireGuardKeyPair:
    private = base64.b64encode(_clamp(secrets.token_bytes(32))).decode()
    return WireGuardKeyPair(private_key=private, public_key=wireguard_public_key(private))


def is_wireguard_key(key: str) -> bool:
    try:
        _decode_key(key)
    except ValueError:
        return False
    return True
