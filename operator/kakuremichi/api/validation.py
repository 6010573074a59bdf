"""Validation rules of the data-model document, as pure functions.

Each check returns the value it accepted or raises ``ValueError`` whose message says what is wrong;
the pydantic models prefix it with the field's location, so a user reads ``spec.domain: ...``.

The same rules go into the CRD schema (see :mod:`kakuremichi.api.crd`): there they are RE2
patterns plus CEL ``matches()`` rules, built from the regular expressions below so that both
sides stay identical.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from decimal import Decimal

# Resource names: the document allows 1-64 of [A-Za-z0-9_-]; Kubernetes object names are lower-case
# RFC 1123 labels. The name must satisfy both, since ``metadata.name`` becomes the ``name`` column.
NAME_MAX_LENGTH = 64
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$"

# A DNS label of 1-63 characters, not starting or ending with a hyphen.
_LOWER_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_ANY_CASE_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

DOMAIN_MAX_LENGTH = 253
# Two or more lower-case labels, no trailing dot, no wildcard.
DOMAIN_PATTERN = rf"^{_LOWER_LABEL}(\.{_LOWER_LABEL})+$"
# A last label made only of digits is not a host name (it is how IPv4 addresses end).
NUMERIC_LAST_LABEL_PATTERN = r"(^|\.)[0-9]+$"

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^{_OCTET}(\.{_OCTET}){{3}}$"
# Unicast IPv4 usable as a public address: first octet 1-126 or 128-223 (so not 0/8, 127/8,
# multicast 224/4 or reserved 240/4 including broadcast).
_PUBLIC_FIRST_OCTET = r"(22[0-3]|2[01][0-9]|1[3-9][0-9]|12[0-689]|1[01][0-9]|[1-9][0-9]|[1-9])"
PUBLIC_IPV4_PATTERN = rf"^{_PUBLIC_FIRST_OCTET}(\.{_OCTET}){{3}}$"

_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
TARGET_MAX_LENGTH = 255
# host:port where host is a DNS name (one label is fine: "localhost"), IPv4 or bracketed IPv6.
# The pattern checks the shape; the bracketed part is checked exactly by the models.
TARGET_PATTERN = rf"^({_ANY_CASE_LABEL}(\.{_ANY_CASE_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\]):{_PORT}$"
# A host that looks numeric (digits and dots only) must then be a well-formed IPv4 address.
NUMERIC_TARGET_HOST_PATTERN = r"^[0-9.]+:"
IPV4_TARGET_PATTERN = rf"^{_OCTET}(\.{_OCTET}){{3}}:"

# A TenantPolicy's domains: exact names, or ``*.suffix`` for every name below a suffix.
DOMAIN_PATTERN_PATTERN = rf"^(\*\.)?{_LOWER_LABEL}(\.{_LOWER_LABEL})+$"
# Namespace names are RFC 1123 labels.
NAMESPACE_MAX_LENGTH = 63
NAMESPACE_PATTERN = rf"^{_LOWER_LABEL}$"

SECRET_NAME_MAX_LENGTH = 253
# Secret names are RFC 1123 subdomains.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # noqa: S105 - a pattern

REGION_MAX_LENGTH = 32
REGION_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"

# Kubernetes resource quantities as people write them for CPU and memory: a plain decimal number
# with an optional suffix (no signs or exponents, which the API server would take but nobody
# means for a pod's resources).
_QUANTITY_SUFFIXES = {
    "m": Decimal("0.001"), "": Decimal(1),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip
QUANTITY_MAX_LENGTH = 32
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"

_name_re = re.compile(NAME_PATTERN)
_lower_label_re = re.compile(rf"^{_LOWER_LABEL}$")
_any_case_label_re = re.compile(rf"^{_ANY_CASE_LABEL}$")
_digits_re = re.compile(r"^[0-9]+$")
_region_re = re.compile(REGION_PATTERN)
_secret_name_re = re.compile(SECRET_NAME_PATTERN)
_quantity_re = re.compile(QUANTITY_PATTERN)
_numeric_host_re = re.compile(r"^[0-9.]+$")


def resource_name(value: str) -> str:
    """Agent/Gateway/Tunnel/Certificate name: 1-64 of lower-case letters, digits and '-'."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > NAME_MAX_LENGTH:
        raise ValueError(f"must be at most {NAME_MAX_LENGTH} characters, got {len(value)}")
    if not _name_re.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def secret_name(value: str) -> str:
    """The name of a Secret (an RFC 1123 subdomain): lower-case letters, digits, '-', '.'."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > SECRET_NAME_MAX_LENGTH:
        raise ValueError(f"must be at most {SECRET_NAME_MAX_LENGTH} characters, got {len(value)}")
    if not _secret_name_re.match(value):
        raise ValueError(f"{value!r} is not a valid Secret name")
    return value


def domain_name(value: str) -> str:
    """A public DNS name a tunnel is served on, e.g. ``app.example.com``."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > DOMAIN_MAX_LENGTH:
        raise ValueError(f"must be at most {DOMAIN_MAX_LENGTH} characters, got {len(value)}")
    if value.endswith("."):
        raise ValueError(f"{value!r} must not end with a dot")
    if "*" in value:
        raise ValueError(f"{value!r}: wildcard domains are not supported")
    if value != value.lower():
        raise ValueError(f"{value!r} must be lower-case")
    if _is_ip_address(value.strip("[]")):
        raise ValueError(f"{value!r} is an IP address, not a domain name")
    labels = value.split(".")
    if len(labels) < 2:
        raise ValueError(f"{value!r} needs at least two labels, like 'app.example.com'")
    for label in labels:
        _check_label(value, label, _lower_label_re)
    if _digits_re.match(labels[-1]):
        raise ValueError(f"{value!r}: the last label must not be all-numeric")
    return value


def domain_pattern(value: str) -> str:
    """A name a TenantPolicy lets namespaces claim: ``app.example.com``, or ``*.example.com``
    for every name below ``example.com``."""
    domain_name(value.removeprefix("*.") if value.startswith("*.") else value)
    return value


def namespace_name(value: str) -> str:
    """A Kubernetes namespace name: a lower-case RFC 1123 label."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > NAMESPACE_MAX_LENGTH:
        raise ValueError(f"must be at most {NAMESPACE_MAX_LENGTH} characters, got {len(value)}")
    _check_label(value, value, _lower_label_re)
    return value


def target_address(value: str) -> str:
    """Where an agent forwards a tunnel's traffic: ``host:port``, e.g. ``localhost:8080``."""
    host, port_text = _split_host_port(value)
    if not port_text.isdigit() or port_text != str(int(port_text)):
        raise ValueError(f"{value!r}: port {port_text!r} must be a number without leading zeros")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port must be between 1 and 65535, got {port}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: IPv6 address is missing its closing ']'")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{value!r}: {host[1:-1]!r} is not a valid IPv6 address") from None
    elif _numeric_host_re.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not a valid IPv4 address") from None
    else:
        if len(host) > DOMAIN_MAX_LENGTH:
            raise ValueError(f"{value!r}: host must be at most {DOMAIN_MAX_LENGTH} characters")
        for label in host.split("."):
            _check_label(value, label, _any_case_label_re)
    if len(value) > TARGET_MAX_LENGTH:
        raise ValueError(f"must be at most {TARGET_MAX_LENGTH} characters")
    return value


def public_ipv4(value: str) -> str:
    """A gateway's public address: a unicast IPv4 address outside 0/8, 127/8 and multicast."""
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 address") from None
    first_octet = int(str(address).split(".")[0])
    if first_octet == 0:
        raise ValueError(f"{value!r} is in 0.0.0.0/8, which is not a usable address")
    if address.is_loopback:
        raise ValueError(f"{value!r} is a loopback address (127.0.0.0/8)")
    if address.is_multicast:
        raise ValueError(f"{value!r} is a multicast address (224.0.0.0/4)")
    if first_octet >= 240:
        raise ValueError(f"{value!r} is in the reserved range 240.0.0.0/4, not unicast")
    return str(address)


def cidr(value: str) -> str:
    """An address range in CIDR notation (IPv4 or IPv6), e.g. ``10.0.0.0/8``; host bits are
    cleared (``10.1.2.3/8`` is ``10.0.0.0/8``), as Kubernetes' ``isCIDR`` accepts them."""
    if "/" not in value:
        raise ValueError(
            f"{value!r} is not a CIDR range: write it with its prefix, e.g. 10.0.0.0/8"
        )
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a CIDR range such as 10.0.0.0/8 or 2001:db8::/32"
        ) from None


def region(value: str) -> str:
    """A gateway's region label, e.g. ``tokyo``: 1-32 lower-case letters, digits and '-'."""
    if not _region_re.match(value):
        raise ValueError(
            f"{value!r} is not a valid region: 1-{REGION_MAX_LENGTH} lower-case letters, digits "
            "and '-'"
        )
    return value


def quantity(value: str) -> str:
    """A CPU or memory amount the way a Pod's resources take it, e.g. ``500m``, ``2``, ``256Mi``."""
    if not _quantity_re.match(value):
        raise ValueError(
            f"{value!r} is not a resource quantity: a number with an optional suffix, e.g. 500m "
            "or 2 (CPUs), 256Mi or 1Gi (memory)"
        )
    return value


def quantity_amount(value: str) -> Decimal:
    """The amount a quantity stands for (CPUs, bytes)."""
    match = _quantity_re.match(quantity(value))
    assert match is not None
    suffix = match.group(2) or ""
    return Decimal(value.removesuffix(suffix)) * _QUANTITY_SUFFIXES[suffix]


@dataclass(frozen=True)
class HostPort:
    """A parsed target: the host without brackets and the port."""

    host: str
    port: int

    @classmethod
    def parse(cls, target: str) -> HostPort:
        host, port = _split_host_port(target_address(target))
        return cls(host=host.strip("[]"), port=int(port))


def _split_host_port(value: str) -> tuple[str, str]:
    if "://" in value:
        raise ValueError(f"{value!r} must be host:port without a scheme, like 'localhost:8080'")
    if ":" not in value:
        raise ValueError(f"{value!r} must be host:port, like 'localhost:8080'")
    host, _, port = value.rpartition(":")
    if not host:
        raise ValueError(f"{value!r} is missing the host before ':'")
    if not port:
        raise ValueError(f"{value!r} is missing the port after ':'")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, like '[::1]:8080'")
    return host, port


def _check_label(value: str, label: str, pattern: re.Pattern[str]) -> None:
    if not label:
        raise ValueError(f"{value!r} has an empty label")
    if len(label) > 63:
        raise ValueError(f"{value!r}: label {label[:20]!r}... is longer than 63 characters")
    if not pattern.match(label):
        raise ValueError(
            f"{value!r}: label {label!r} may hold only letters, digits and '-', "
            "and must not start or end with '-'"
        )


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
