"""How secrets sit in the database, so that a copied file hands out no working credentials.

Two kinds of secret are stored:

* **API keys** are only ever *checked*, never read back, so the database keeps a keyed
  digest: ``"h1:" + base64url(HMAC-SHA256(k_digest, api_key))``. A keyed HMAC rather than a
  plain hash because API keys are high-entropy but not secret-salted: without the master
  key, a leaked digest cannot be tested against guesses offline. It is deterministic on
  purpose, so the UNIQUE index on ``api_key`` and lookup by presented key keep working.
* **Certificate private keys** must be read back, so they are sealed with AES-256-GCM:
  ``"s1:" + base64url(nonce || ciphertext || tag)``. The caller's ``context`` (for example
  ``"certificates.private_key:app.example.com"``) is bound in as associated data, so a sealed
  value copied into another row or column fails to unseal instead of silently decrypting.

Both subkeys are derived from one 32-byte master key with HKDF-SHA256 under distinct labels,
so one key file protects everything and the two uses can never collide. The ``h1:``/``s1:``
prefixes version the formats for a later change of algorithm or key rotation.

The master key lives outside the database (a file, typically a mounted Kubernetes Secret).
This module does no I/O other than :meth:`Sealer.from_key_file`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KEY_SIZE", "Sealer", "SealingError"]

KEY_SIZE: Final = 32
"""Length in bytes of the master key."""

_DIGEST_PREFIX: Final = "h1:"
_SEAL_PREFIX: Final = "s1:"
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_INFO_DIGEST: Final = b"kakuremichi/control/store/v1/api-key-digest/hmac-sha256"
_INFO_SEAL: Final = b"kakuremichi/control/store/v1/seal/aes-256-gcm"


class SealingError(ValueError):
    """A key is malformed, or a sealed value cannot be opened (wrong key/context, tampered)."""


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    # validate=True rejects stray characters instead of silently skipping them, so a mangled
    # token fails here with a clear message rather than later as an authentication failure.
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _derive(master_key: bytes, info: bytes) -> bytes:
    # No salt: the master key is already uniformly random, which is the case where HKDF's
    # extract step needs none (RFC 5869, section 3.1).
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(master_key)


class Sealer:
    """Digests API keys and seals/unseals stored secrets with subkeys of one master key."""

    __slots__ = ("_aead", "_digest_key")

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, bytes | bytearray):
            msg = f"master key must be bytes, not {type(master_key).__name__}"
            raise SealingError(msg)
        if len(master_key) != KEY_SIZE:
            msg = f"master key must be exactly {KEY_SIZE} bytes, got {len(master_key)}"
            raise SealingError(msg)
        key = bytes(master_key)
        self._digest_key = _derive(key, _INFO_DIGEST)
        self._aead = AESGCM(_derive(key, _INFO_SEAL))

    def __repr__(self) -> str:
        return "Sealer(<key redacted>)"

    @staticmethod
    def generate_key() -> bytes:
        """Return a new random master key (raw bytes; base64-encode it for a key file)."""
        return secrets.token_bytes(KEY_SIZE)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> Sealer:
        """Load the master key from a file holding it base64-encoded (surrounding whitespace ok).

        Standard and url-safe alphabets are both accepted, padding optional, since key files
        are written by hand or by ``kubectl create secret`` as often as by this code.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="ascii").strip()
        except UnicodeDecodeError as exc:
            msg = f"key file {file} is not base64 text"
            raise SealingError(msg) from exc
        return cls.from_key_text(text, f"key file {file}")

    @classmethod
    def from_key_text(cls, text: str, where: str = "the key") -> Sealer:
        """The master key from its base64 text (as in a key file or a Secret)."""
        file = where
        text = text.strip()
        normalized = text.replace("-", "+").replace("_", "/")
        normalized += "=" * (-len(normalized) % 4)
        try:
            key = base64.b64decode(normalized, validate=True)
        except (binascii.Error, ValueError) as exc:
            msg = f"{file} is not valid base64"
            raise SealingError(msg) from exc
        if len(key) != KEY_SIZE:
            msg = (
                f"{file} holds {len(key)} bytes after base64 decoding; "
                f"the master key must be exactly {KEY_SIZE} bytes"
            )
            raise SealingError(msg)
        return cls(key)

    # -- API keys -------------------------------------------------------------------------

    def digest_api_key(self, api_key: str) -> str:
        """Return the deterministic keyed digest stored in ``api_key`` columns (46 chars)."""
        mac = hmac.new(self._digest_key, api_key.encode("utf-8"), hashlib.sha256).digest()
        return _DIGEST_PREFIX + _b64url_encode(mac)

    def verify_api_key(self, api_key: str, digest: str) -> bool:
        """Check a presented API key against a stored digest in constant time."""
        expected = self.digest_api_key(api_key).encode("ascii")
        # Encode the stored side too: compare_digest rejects non-ASCII str with TypeError,
        # and a corrupted row should simply not match.
        return hmac.compare_digest(expected, digest.encode("utf-8", "replace"))

    # -- sealed values --------------------------------------------------------------------

    def seal(self, plaintext: str, context: str) -> str:
        """Encrypt ``plaintext`` bound to ``context`` (where the value is stored)."""
        nonce = secrets.token_bytes(_NONCE_SIZE)
        ciphertext = self._aead.encrypt(nonce, plaintext.encode("utf-8"), _aad(context))
        return _SEAL_PREFIX + _b64url_encode(nonce + ciphertext)

    def unseal(self, token: str, context: str) -> str:
        """Decrypt a value made by :meth:`seal` with the same key and ``context``."""
        if not token.startswith(_SEAL_PREFIX):
            msg = f"unknown sealed-value format (expected prefix {_SEAL_PREFIX!r})"
            raise SealingError(msg)
        try:
            raw = _b64url_decode(token[len(_SEAL_PREFIX) :])
        except (binascii.Error, ValueError) as exc:
            msg = "sealed value is not valid base64url"
            raise SealingError(msg) from exc
        if len(raw) < _NONCE_SIZE + _TAG_SIZE:
            msg = "sealed value is truncated"
            raise SealingError(msg)
        nonce, ciphertext = raw[:_NONCE_SIZE], raw[_NONCE_SIZE:]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _aad(context))
        except InvalidTag as exc:
            msg = "cannot unseal value: wrong key, wrong context, or the value was tampered with"
            raise SealingError(msg) from exc
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError as exc:  # pragma: no cover - authenticated, so only on bugs
            msg = "sealed value does not hold UTF-8 text"
            raise SealingError(msg) from exc


def _aad(context: str) -> bytes:
    if not context:
        # An empty context would make every sealed value interchangeable with every other.
        msg = "context must be a non-empty string naming where the value is stored"
        raise SealingError(msg)
    return context.encode("utf-8")
