"""Control-channel messages keep the data-model document's shape and refuse malformed frames."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from kakuremichi.api import protocol
from kakuremichi.control.credentials import generate_api_key, generate_wireguard_keypair

KEY_A = generate_wireguard_keypair().public_key
KEY_B = generate_wireguard_keypair().public_key
ID_A, ID_B = str(uuid.uuid4()), str(uuid.uuid4())

# The document's example messages, plus the fields this project adds (version, ports, addresses).
AGENT_CONFIG: dict[str, Any] = {
    "type": "config",
    "data": {
        "version": 7,
        "heartbeatSeconds": 10.0,
        "agent": {"id": ID_A, "virtualIp": "10.1.0.100", "subnet": "10.1.0.0/24"},
        "gateways": [
            {"id": ID_B, "publicIp": "1.2.3.4", "wireguardPublicKey": KEY_B,
             "wireguardPort": 51820, "address": "10.1.0.1"},
        ],
        "tunnels": [{"domain": "app.example.com", "target": "localhost:8080", "enabled": True}],
    },
}  # fmt: skip
GATEWAY_CONFIG: dict[str, Any] = {
    "type": "config",
    "data": {
        "version": 3,
        "heartbeatSeconds": 10.0,
        "gateway": {"id": ID_B, "publicIp": "1.2.3.4", "index": 1},
        "agents": [
            {"id": ID_A, "virtualIp": "10.1.0.100", "subnet": "10.1.0.0/24",
             "wireguardPublicKey": KEY_A, "address": "10.1.0.1"},
        ],
        "tunnels": [
            {"domain": "app.example.com", "agentVirtualIp": "10.1.0.100",
             "target": "localhost:8080", "enabled": True},
        ],
        "certificates": [
            {"domain": "app.example.com", "certificate": "-----BEGIN CERTIFICATE-----",
             "privateKey": "-----BEGIN PRIVATE KEY-----"},
        ],
        "acmeChallenges": [
            {"domain": "app.example.com", "token": "tok_en-1", "keyAuthorization": "tok_en-1.xyz"}
        ],
    },
}  # fmt: skip


def test_agent_config_round_trips_in_the_documents_shape() -> None:
    message = protocol.agent_inbound.validate_json(json.dumps(AGENT_CONFIG))
    assert isinstance(message, protocol.AgentConfigMessage)
    assert message.data.gateways[0].public_ip == "1.2.3.4"
    assert json.loads(protocol.encode(message)) == AGENT_CONFIG


def test_gateway_config_round_trips_in_the_documents_shape() -> None:
    message = protocol.gateway_inbound.validate_json(json.dumps(GATEWAY_CONFIG))
    assert isinstance(message, protocol.GatewayConfigMessage)
    assert message.data.tunnels[0].agent_virtual_ip == "10.1.0.100"
    encoded = json.loads(protocol.encode(message))
    # Defaults the document does not list are filled in; everything it lists is kept as is.
    assert encoded["data"]["gateway"] == {
        **GATEWAY_CONFIG["data"]["gateway"],
        "wireguardPort": 51820,
        "httpPort": 80,
        "httpsPort": 443,
    }
    for key in ("agents", "tunnels", "certificates", "acmeChallenges"):
        assert encoded["data"][key] == GATEWAY_CONFIG["data"][key]


def test_an_entry_an_edge_cannot_read_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    """One tenant's route that slipped past control's checks (or a newer control's entry) is
    left out of the config an edge applies; every other tenant's tunnels, certificates and
    backends are applied, not kept stale behind a refused frame."""
    gateway = json.loads(json.dumps(GATEWAY_CONFIG))
    bad_rule = {"backends": [{"stream": "not a backend", "weight": 1}]}
    gateway["data"]["tunnels"].append({"domain": "evil.example.com", "target": "localhost:1",
                                       "rules": [bad_rule]})  # fmt: skip
    gateway["data"]["certificates"].insert(0, {"domain": "-bad-", "certificate": "x",
                                               "privateKey": "y"})  # fmt: skip
    message = protocol.gateway_inbound.validate_json(json.dumps(gateway))
    assert isinstance(message, protocol.GatewayConfigMessage)
    assert [t.domain for t in message.data.tunnels] == ["app.example.com"]
    assert [c.domain for c in message.data.certificates] == ["app.example.com"]
    assert "left out an entry" in caplog.text
    agent = json.loads(json.dumps(AGENT_CONFIG))
    agent["data"]["backends"] = [{"name": "shop/web:80", "endpoints": ["10.244.1.5:8080"]},
                                 {"name": "../etc", "endpoints": []}]  # fmt: skip
    read = protocol.agent_inbound.validate_json(json.dumps(agent))
    assert isinstance(read, protocol.AgentConfigMessage)
    assert [b.name for b in read.data.backends or ()] == ["shop/web:80"]


def test_every_field_the_document_lists_is_present() -> None:
    agent = json.loads(protocol.encode(protocol.agent_inbound.validate_python(AGENT_CONFIG)))
    assert {"agent", "gateways", "tunnels"} <= agent["data"].keys()
    assert {"id", "virtualIp", "subnet"} <= agent["data"]["agent"].keys()
    assert {"id", "publicIp", "wireguardPublicKey"} <= agent["data"]["gateways"][0].keys()
    assert {"domain", "target"} <= agent["data"]["tunnels"][0].keys()
    gateway = json.loads(protocol.encode(protocol.gateway_inbound.validate_python(GATEWAY_CONFIG)))
    assert {"gateway", "agents", "tunnels", "certificates"} <= gateway["data"].keys()
    assert {"id", "publicIp"} <= gateway["data"]["gateway"].keys()
    assert {"id", "virtualIp", "subnet", "wireguardPublicKey"} <= gateway["data"]["agents"][
        0
    ].keys()
    assert {"domain", "agentVirtualIp", "target"} <= gateway["data"]["tunnels"][0].keys()
    assert {"domain", "certificate", "privateKey"} <= gateway["data"]["certificates"][0].keys()


def test_client_messages_are_told_apart_by_type() -> None:
    key = generate_api_key("agent")
    auth = protocol.client_message.validate_json(json.dumps({"type": "auth", "apiKey": key}))
    assert isinstance(auth, protocol.AuthMessage) and auth.api_key == key
    ack = protocol.client_message.validate_python({"type": "ack", "version": 7})
    assert isinstance(ack, protocol.AckMessage) and ack.ok
    status = protocol.client_message.validate_python(
        {"type": "status", "data": {"client": {"version": "0.1.0", "wireguardMode": "userspace"},
                                    "configVersion": 7, "peers": [{"publicKey": KEY_A}]}}
    )  # fmt: skip
    assert isinstance(status, protocol.StatusMessage)
    assert status.data.client.wireguard_mode == "userspace"


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "auth"}, "apiKey"),
        ({"type": "auth", "apiKey": "x" * 200}, "apiKey"),
        ({"type": "auth", "apiKey": "k", "extra": 1}, "extra"),
        ({"type": "shout"}, "type"),
        ({"type": "ack", "version": -1}, "version"),
        ({}, "type"),
    ],
)
def test_malformed_client_frames_are_refused(frame: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        protocol.client_message.validate_python(frame)
    assert field in str(error.value)


def test_config_refuses_invalid_peer_values_and_leaves_out_invalid_tunnels() -> None:
    bad = json.loads(json.dumps(AGENT_CONFIG))
    bad["data"]["tunnels"][0]["domain"] = "not a domain"
    bad["data"]["gateways"][0]["wireguardPublicKey"] = "short"
    with pytest.raises(ValidationError) as error:
        protocol.agent_inbound.validate_python(bad)
    assert "gateways.0.wireguardPublicKey" in str(error.value)
    bad["data"]["gateways"] = AGENT_CONFIG["data"]["gateways"]
    read = protocol.agent_inbound.validate_python(bad)
    assert isinstance(read, protocol.AgentConfigMessage) and read.data.tunnels == []


def test_encode_leaves_out_unset_optionals() -> None:
    frame = protocol.encode(protocol.ErrorMessage(code="unauthorized", message="invalid API key"))
    assert json.loads(frame) == {
        "type": "error",
        "code": "unauthorized",
        "message": "invalid API key",
    }
    assert "wireguardPrivateKey" not in protocol.encode(
        protocol.agent_inbound.validate_python(AGENT_CONFIG)
    )


def test_edges_read_what_control_sends_tolerantly() -> None:
    """A newer control may add fields (at any depth): an edge ignores what it does not know and
    applies the rest, instead of refusing every config until it is upgraded."""
    newer = json.loads(json.dumps(AGENT_CONFIG))
    newer["data"]["drainBy"] = "2027-01-01T00:00:00Z"
    newer["data"]["tunnels"][0]["appProtocol"] = "H3"
    newer["data"]["gateways"][0]["weight"] = 3
    message = protocol.agent_inbound.validate_python(newer)
    assert isinstance(message, protocol.AgentConfigMessage)
    assert message.data.tunnels[0].domain == AGENT_CONFIG["data"]["tunnels"][0]["domain"]
    assert "drainBy" not in protocol.encode(message)
