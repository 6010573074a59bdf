"""Secret sealing: API-key digests and AES-GCM sealed values."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kakuremichi.control.store import (
    Agent,
    Certificate,
    Sealer,
    SealingError,
    create_engine_for,
    session_factory,
    upgrade,
)

CONTEXT = "certificates.private_key:app.example.com"
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-test-only\n"
    "-----END PRIVATE KEY-----\n"
)
API_KEY = "agt_a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6"


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(Sealer.generate_key())


def test_generate_key_is_random_and_sized() -> None:
    first, second = Sealer.generate_key(), Sealer.generate_key()
    assert len(first) == 32
    assert first != second


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_key_length_rejected(length: int) -> None:
    with pytest.raises(SealingError, match="exactly 32 bytes"):
        Sealer(b"\x00" * length)


def test_repr_hides_key(sealer: Sealer) -> None:
    assert "redacted" in repr(sealer)


def test_round_trip(sealer: Sealer) -> None:
    token = sealer.seal(PEM, CONTEXT)
    assert token.startswith("s1:")
    assert PEM not in token
    assert sealer.unseal(token, CONTEXT) == PEM


def test_seal_is_randomized(sealer: Sealer) -> None:
    assert sealer.seal(PEM, CONTEXT) != sealer.seal(PEM, CONTEXT)


def test_round_trip_unicode_and_empty(sealer: Sealer) -> None:
    for plaintext in ("", "隠れ道 🔑"):
        assert sealer.unseal(sealer.seal(plaintext, CONTEXT), CONTEXT) == plaintext


def test_wrong_key_fails(sealer: Sealer) -> None:
    token = sealer.seal(PEM, CONTEXT)
    with pytest.raises(SealingError, match="wrong key"):
        Sealer(Sealer.generate_key()).unseal(token, CONTEXT)


def test_wrong_context_fails(sealer: Sealer) -> None:
    token = sealer.seal(PEM, CONTEXT)
    with pytest.raises(SealingError, match="wrong context"):
        sealer.unseal(token, "certificates.private_key:other.example.com")


def test_empty_context_rejected(sealer: Sealer) -> None:
    with pytest.raises(SealingError, match="context"):
        sealer.seal(PEM, "")


def test_tampered_token_fails(sealer: Sealer) -> None:
    token = sealer.seal(PEM, CONTEXT)
    body = bytearray(base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4)))
    for index in (0, 12, len(body) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(body)
        tampered[index] ^= 0x01
        bad = "s1:" + base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        with pytest.raises(SealingError, match="tampered"):
            sealer.unseal(bad, CONTEXT)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (PEM, "unknown sealed-value format"),
        ("s2:AAAA", "unknown sealed-value format"),
        ("s1:***", "base64url"),
        ("s1:AAAA", "truncated"),
    ],
)
def test_malformed_tokens(sealer: Sealer, token: str, message: str) -> None:
    with pytest.raises(SealingError, match=message):
        sealer.unseal(token, CONTEXT)


def test_digest_deterministic_and_fits_column(sealer: Sealer) -> None:
    digest = sealer.digest_api_key(API_KEY)
    assert digest == sealer.digest_api_key(API_KEY)
    assert digest.startswith("h1:")
    assert len(digest) <= 64
    assert API_KEY not in digest
    assert sealer.digest_api_key(API_KEY + "x") != digest


def test_digest_differs_across_keys(sealer: Sealer) -> None:
    other = Sealer(Sealer.generate_key())
    assert sealer.digest_api_key(API_KEY) != other.digest_api_key(API_KEY)


def test_digest_and_seal_subkeys_are_separated() -> None:
    """Same master key, two derived keys: the digest is not a MAC under the sealing key."""
    key = b"\x01" * 32
    sealer = Sealer(key)
    assert sealer.digest_api_key(API_KEY) == Sealer(key).digest_api_key(API_KEY)
    raw_mac = hmac.new(key, API_KEY.encode(), hashlib.sha256).digest()
    assert (
        sealer.digest_api_key(API_KEY)
        != "h1:" + base64.urlsafe_b64encode(raw_mac).rstrip(b"=").decode()
    )


def test_verify_api_key(sealer: Sealer) -> None:
    digest = sealer.digest_api_key(API_KEY)
    assert sealer.verify_api_key(API_KEY, digest) is True
    assert sealer.verify_api_key(API_KEY + "x", digest) is False
    assert sealer.verify_api_key(API_KEY, "") is False
    assert sealer.verify_api_key(API_KEY, "h1:ünïcode") is False
    assert Sealer(Sealer.generate_key()).verify_api_key(API_KEY, digest) is False


def test_from_key_file(tmp_path: Path) -> None:
    key = Sealer.generate_key()
    standard = tmp_path / "standard.key"
    standard.write_text(base64.b64encode(key).decode() + "\n")
    urlsafe = tmp_path / "urlsafe.key"
    urlsafe.write_text(base64.urlsafe_b64encode(key).rstrip(b"=").decode())

    token = Sealer(key).seal(PEM, CONTEXT)
    for path in (standard, urlsafe):
        assert Sealer.from_key_file(path).unseal(token, CONTEXT) == PEM


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (base64.b64encode(b"\x00" * 16), "holds 16 bytes"),
        (base64.b64encode(b"\x00" * 48), "holds 48 bytes"),
        (b"not base64 at all!", "not valid base64"),
        (b"\xff\xfe", "not base64 text"),
    ],
)
def test_from_key_file_rejects_bad_content(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(SealingError, match=message):
        Sealer.from_key_file(path)


def test_copied_database_reveals_no_secrets(tmp_path: Path, sealer: Sealer) -> None:
    """The raw file (and its WAL) holds neither the API key nor the PEM private key."""
    db = tmp_path / "k.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = create_engine_for(url)
    try:
        with session_factory(engine)() as session:
            session.add(
                Agent(
                    id=uuid.uuid4(),
                    name="home-server",
                    api_key=sealer.digest_api_key(API_KEY),
                    wireguard_public_key="wg=",
                    virtual_ip="10.1.0.100",
                    subnet="10.1.0.0/24",
                )
            )
            session.add(
                Certificate(
                    id=uuid.uuid4(),
                    domain="app.example.com",
                    certificate="-----BEGIN CERTIFICATE-----",
                    private_key=sealer.seal(PEM, CONTEXT),
                    expires_at=datetime.now(UTC) + timedelta(days=90),
                )
            )
            session.commit()

        raw = b"".join(
            path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("k.db")
        )
        assert b"home-server" in raw, "sanity: the rows really are in the bytes we read"
        assert API_KEY.encode() not in raw
        assert b"BEGIN PRIVATE KEY" not in raw
        assert b"test-only" not in raw

        # With the key, the stored values still do their job.
        with session_factory(engine)() as session:
            agent = session.query(Agent).one()
            certificate = session.query(Certificate).one()
            assert sealer.verify_api_key(API_KEY, agent.api_key)
            assert sealer.unseal(certificate.private_key, CONTEXT) == PEM
            # Without it, they are useless.
            stranger = Sealer(Sealer.generate_key())
            assert not stranger.verify_api_key(API_KEY, agent.api_key)
            with pytest.raises(SealingError):
                stranger.unseal(certificate.private_key, CONTEXT)
    finally:
        engine.dispose()
