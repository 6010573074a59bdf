"""Validated field types shared by the custom resources and the control-channel messages.

Every type pairs a Python check from :mod:`kakuremichi.api.validation` (precise messages) with
the JSON schema the CRD carries (RE2 ``pattern`` plus CEL ``matches()`` rules with messages), so
the API server and the operator reject the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from kakuremichi.api import validation


def cel_match(pattern: str) -> str:
    """The CEL expression ``self.matches('<pattern>')`` (RE2, unanchored like ``re.search``)."""
    literal = pattern.replace("\\", "\\\\").replace("'", "\\'")
    return f"self.matches('{literal}')"


def cel_rule(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One entry of a CRD schema's ``x-kubernetes-validations``; ``field_path`` (relative,
    e.g. ``.limits.memory``) is the field the API server's error then names."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def _string_schema(**schema: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", **schema})


def _said(check: Callable[[str], str], sentence: str) -> AfterValidator:
    """``check``, whose refusal reads ``sentence`` first, then what exactly is wrong."""

    def run(value: str) -> str:
        try:
            return check(value)
        except ValueError as error:
            raise ValueError(f"{sentence} ({error})") from None

    return AfterValidator(run)


def _shape(pattern: str, sentence: str) -> JsonDict:
    """The pattern as a CEL rule with the sentence as its message, instead of a ``pattern``:
    the API server would answer a pattern mismatch with the regular expression itself."""
    return cel_rule(cel_match(pattern), sentence)


SENTENCES: dict[str, str] = {
    "ResourceName": "must be a name of 1-64 lower-case letters, digits and '-', starting and "
    "ending with a letter or digit, such as web-1",
    "DomainName": "must be a lower-case DNS name such as app.example.com, without a trailing "
    "dot or wildcard",
    "DomainPattern": "must be a lower-case DNS name such as app.example.com, or *.example.com "
    "for every name below example.com",
    "NamespaceName": "must be a namespace name of 1-63 lower-case letters, digits and '-', "
    "starting and ending with a letter or digit",
    "TargetAddress": "must be host:port with a port of 1-65535, such as localhost:8080, "
    "10.0.0.5:80 or [2001:db8::1]:443",
    "PublicIPv4": "must be a public unicast IPv4 address such as 203.0.113.10 (not in 0.0.0.0/8, "
    "127.0.0.0/8, multicast or 240.0.0.0/4)",
    "CidrRange": "must be a CIDR range such as 10.0.0.0/8 or 2001:db8::/32",
    "RegionName": "must be a region name of 1-32 lower-case letters, digits and '-', starting "
    "and ending with a letter or digit, such as tokyo-1",
    "Quantity": "must be a quantity such as 500m, 2, 256Mi or 1Gi (a number with an optional "
    "suffix m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi or Ei)",
    "SecretName": "must be a Secret name of lower-case letters, digits, '-' and '.', starting "
    "and ending with a letter or digit, such as app-tls",
}
"""What a user reads when a field of that type is refused, by the API server (the CRD's CEL
rule) or by ``kakuremichi validate`` and the operator (the model): one sentence each."""


_NOT_AN_IP_ADDRESS = cel_rule(
    "!" + cel_match(validation.NUMERIC_LAST_LABEL_PATTERN),
    "must be a domain name, not an IP address: the last label must not be all-numeric",
)

ResourceName = Annotated[
    str,
    _said(validation.resource_name, SENTENCES["ResourceName"]),
    _string_schema(
        minLength=1,
        maxLength=validation.NAME_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [_shape(validation.NAME_PATTERN, SENTENCES["ResourceName"])]
        },
    ),
]

DomainName = Annotated[
    str,
    _said(validation.domain_name, SENTENCES["DomainName"]),
    _string_schema(
        minLength=1,
        maxLength=validation.DOMAIN_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [
                _shape(validation.DOMAIN_PATTERN, SENTENCES["DomainName"]),
                _NOT_AN_IP_ADDRESS,
            ]
        },
    ),
]

DomainPattern = Annotated[
    str,
    _said(validation.domain_pattern, SENTENCES["DomainPattern"]),
    _string_schema(
        minLength=1,
        maxLength=validation.DOMAIN_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [
                _shape(validation.DOMAIN_PATTERN_PATTERN, SENTENCES["DomainPattern"]),
                _NOT_AN_IP_ADDRESS,
            ]
        },
    ),
]
"""``app.example.com``, or ``*.example.com`` for every name below ``example.com``."""

NamespaceName = Annotated[
    str,
    _said(validation.namespace_name, SENTENCES["NamespaceName"]),
    _string_schema(
        minLength=1,
        maxLength=validation.NAMESPACE_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [
                _shape(validation.NAMESPACE_PATTERN, SENTENCES["NamespaceName"])
            ]
        },
    ),
]

TargetAddress = Annotated[
    str,
    _said(validation.target_address, SENTENCES["TargetAddress"]),
    _string_schema(
        minLength=3,
        maxLength=validation.TARGET_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [
                _shape(validation.TARGET_PATTERN, SENTENCES["TargetAddress"]),
                cel_rule(
                    f"!{cel_match(validation.NUMERIC_TARGET_HOST_PATTERN)}"
                    f" || {cel_match(validation.IPV4_TARGET_PATTERN)}",
                    "a numeric host must be a valid IPv4 address",
                ),
            ]
        },
    ),
]

PublicIPv4 = Annotated[
    str,
    _said(validation.public_ipv4, SENTENCES["PublicIPv4"]),
    _string_schema(
        maxLength=15,
        **{
            "x-kubernetes-validations": [
                _shape(validation.PUBLIC_IPV4_PATTERN, SENTENCES["PublicIPv4"])
            ]
        },
    ),
]

CidrRange = Annotated[
    str,
    _said(validation.cidr, SENTENCES["CidrRange"]),
    _string_schema(
        maxLength=43,
        **{"x-kubernetes-validations": [cel_rule("isCIDR(self)", SENTENCES["CidrRange"])]},
    ),
]
"""An IPv4 or IPv6 range, e.g. ``10.0.0.0/8``."""

RegionName = Annotated[
    str,
    _said(validation.region, SENTENCES["RegionName"]),
    _string_schema(
        minLength=1,
        maxLength=validation.REGION_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [_shape(validation.REGION_PATTERN, SENTENCES["RegionName"])]
        },
    ),
]

SecretName = Annotated[
    str,
    _said(validation.secret_name, SENTENCES["SecretName"]),
    _string_schema(
        minLength=1,
        maxLength=validation.SECRET_NAME_MAX_LENGTH,
        **{
            "x-kubernetes-validations": [
                _shape(validation.SECRET_NAME_PATTERN, SENTENCES["SecretName"])
            ]
        },
    ),
]


def _quantity_text(value: object) -> object:
    """YAML's ``cpu: 2`` arrives as an integer; the API server keeps it as one (int-or-string)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    _said(validation.quantity, SENTENCES["Quantity"]),
    # As Kubernetes' own quantities: an integer or a string of that shape.
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "maxLength": validation.QUANTITY_MAX_LENGTH,  # (bounds the rule's cost)
            "x-kubernetes-validations": [
                cel_rule(
                    f"type(self) == int || {cel_match(validation.QUANTITY_PATTERN)}",
                    SENTENCES["Quantity"],
                )
            ],
        }
    ),
]


class CamelModel(BaseModel):
    """Base for everything that crosses a boundary: camelCase outside, snake_case inside."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, naming the field the way users write it: ``spec.domain: why``."""
    lines = []
    for problem in error.errors(include_url=False):
        location = ".".join(str(part) for part in problem["loc"]) or "(object)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}")
    return lines


def status_patch(current: BaseModel, updates: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that sets ``updates`` (snake_case field names) and nothing else, so fields
    other writers own (connection state, node admission) are never overwritten with a stale
    copy."""
    updated = current.model_copy(update=dict(updates))
    return updated.model_dump(mode="json", by_alias=True, include=set(updates))
