"""Validated field types shared by the custom resources and the control-channel messages.

Every type pairs a Python check from :mod:`kakuremichi.api.validation` (precise messages) with
the JSON schema the CRD carries (RE2 ``pattern`` plus CEL ``matches()`` rules with messages), so
the API server and the operator reject the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
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


_NOT_AN_IP_ADDRESS = cel_rule(
    "!" + cel_match(validation.NUMERIC_LAST_LABEL_PATTERN),
    "must be a domain name, not an IP address: the last label must not be all-numeric",
)

ResourceName = Annotated[
    str,
    AfterValidator(validation.resource_name),
    _string_schema(
        minLength=1, maxLength=validation.NAME_MAX_LENGTH, pattern=validation.NAME_PATTERN
    ),
]

DomainName = Annotated[
    str,
    AfterValidator(validation.domain_name),
    _string_schema(
        minLength=1,
        maxLength=validation.DOMAIN_MAX_LENGTH,
        pattern=validation.DOMAIN_PATTERN,
        **{"x-kubernetes-validations": [_NOT_AN_IP_ADDRESS]},
    ),
]

DomainPattern = Annotated[
    str,
    AfterValidator(validation.domain_pattern),
    _string_schema(
        minLength=1,
        maxLength=validation.DOMAIN_MAX_LENGTH,
        pattern=validation.DOMAIN_PATTERN_PATTERN,
        **{"x-kubernetes-validations": [_NOT_AN_IP_ADDRESS]},
    ),
]
"""``app.example.com``, or ``*.example.com`` for every name below ``example.com``."""

NamespaceName = Annotated[
    str,
    AfterValidator(validation.namespace_name),
    _string_schema(
        minLength=1, maxLength=validation.NAMESPACE_MAX_LENGTH, pattern=validation.NAMESPACE_PATTERN
    ),
]

TargetAddress = Annotated[
    str,
    AfterValidator(validation.target_address),
    _string_schema(
        minLength=3,
        maxLength=validation.TARGET_MAX_LENGTH,
        pattern=validation.TARGET_PATTERN,
        **{
            "x-kubernetes-validations": [
                cel_rule(
                    f"!{cel_match(validation.NUMERIC_TARGET_HOST_PATTERN)}"
                    f" || {cel_match(validation.IPV4_TARGET_PATTERN)}",
                    "a numeric host must be a valid IPv4 address",
                )
            ]
        },
    ),
]

PublicIPv4 = Annotated[
    str,
    AfterValidator(validation.public_ipv4),
    _string_schema(maxLength=15, pattern=validation.PUBLIC_IPV4_PATTERN),
]

CidrRange = Annotated[
    str,
    AfterValidator(validation.cidr),
    _string_schema(
        maxLength=43,
        **{
            "x-kubernetes-validations": [
                cel_rule("isCIDR(self)", "must be a CIDR range such as 10.0.0.0/8 or 2001:db8::/32")
            ]
        },
    ),
]
"""An IPv4 or IPv6 range, e.g. ``10.0.0.0/8``."""

RegionName = Annotated[
    str,
    AfterValidator(validation.region),
    _string_schema(
        minLength=1, maxLength=validation.REGION_MAX_LENGTH, pattern=validation.REGION_PATTERN
    ),
]


def _quantity_text(value: object) -> object:
    """YAML's ``cpu: 2`` arrives as an integer; the API server keeps it as one (int-or-string)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    AfterValidator(validation.quantity),
    # As Kubernetes' own quantities: an integer or a string with the pattern.
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": validation.QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
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
