"""API keys and WireGuard keys as the data-model document and ``wg`` define them."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from kakuremichi.control import credentials


@pytest.mark.parametrize(("role", "prefix"), [("agent", "agt_"), ("gateway", "gtw_")])
def test_api_key_format(role: credentials.ApiKeyRole, prefix: str) -> None:
    key = credentials.generate_api_key(role)
    assert re.fullmatch(rf"{prefix}[A-Za-z0-9]{{32}}", key)
    assert credentials.api_key_role(key) == role


def test_api_keys_do_not_repeat() -> None:
    keys = {credentials.generate_api_key("agent") for _ in range(2000)}
    assert len(keys) == 2000
    # Every character of the alphabet turns up: the keys are not drawn from a narrow set.
    assert len(set("".join(k[4:] for k in keys))) == 62


@pytest.mark.parametrize(
    "key", ["", "agt_", "agt_short", "xyz_" + "a" * 32, "agt_" + "a" * 31 + "!", "agt_" + "a" * 33]
)
def test_malformed_api_keys_have_no_role(key: str) -> None:
    assert credentials.api_key_role(key) is None


def test_api_key_comparison() -> None:
    key = credentials.generate_api_key("gateway")
    assert credentials.api_keys_equal(key, key)
    assert not credentials.api_keys_equal(key, key[:-1] + ("a" if key[-1] != "a" else "b"))
    assert not credentials.api_keys_equal("", key)


def test_rfc7748_test_vector() -> None:
    # RFC 7748 section 6.1: Alice's private and public key.
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    public = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    encoded = base64.b64encode(private).decode()
    assert credentials.wireguard_public_key(encoded) == base64.b64encode(public).decode()


def test_generated_private_keys_are_clamped_like_wg_genkey() -> None:
    for _ in range(50):
        pair = credentials.generate_wireguard_keypair()
        raw = base64.b64decode(pair.private_key)
        assert len(raw) == 32
        assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64 == 64
        assert credentials.wireguard_public_key(pair.private_key) == pair.public_key
        assert pair.private_key not in repr(pair)


@pytest.mark.parametrize("bad", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_bad_wireguard_keys_are_refused(bad: str) -> None:
    assert not credentials.is_wireguard_key(bad)
    with pytest.raises(ValueError, match="WireGuard key"):
        credentials.wireguard_public_key(bad)


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) is not installed")
def test_byte_compatible_with_wg() -> None:
    def wg(*args: str, stdin: str = "") -> str:
        return subprocess.run(
            ["wg", *args], input=stdin, capture_output=True, text=True, check=True
        ).stdout.strip()

    ours = credentials.generate_wireguard_keypair()
    assert wg("pubkey", stdin=ours.private_key) == ours.public_key
    theirs = wg("genkey")
    assert credentials.wireguard_public_key(theirs) == wg("pubkey", stdin=theirs)
