"""Command-line options defined once, on the settings model they fill.

A field of a settings model carries a :class:`Flag` in its annotation (name, help, metavar, the
environment variable that may give its default); from the model come the parser's options
(:func:`add_flags`), the settings from parsed arguments (:func:`values_from`), the errors
phrased by flag (:func:`flag_errors`) and the documentation's table (:func:`markdown_table`).
The default is the model's; a flag left out leaves it to the model, so the CLI, the settings
and the docs cannot disagree.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Flag:
    name: str
    """``--like-this``."""
    help: str
    """One sentence or two: shown by ``--help`` and in the documentation's table."""
    metavar: str | None = None
    env: str | None = None
    """An environment variable whose value, when set, is the default."""
    default_text: str | None = None
    """How the default reads, when the value itself would not say it well."""
    group: str | None = None
    """A heading of ``--help``, for a family of flags."""


@dataclass(frozen=True)
class FlaggedField:
    field: str
    info: FieldInfo
    flag: Flag

    @property
    def dest(self) -> str:
        return self.field

    def kind(self) -> tuple[str, type[Any]]:
        """("bool" | "list" | "value", the element type)."""
        annotation = self.info.annotation
        options = typing.get_args(annotation) if _is_union(annotation) else ()
        if options:  # X | None
            annotation = next(a for a in options if a is not type(None))
        if annotation is bool:
            return "bool", bool
        if typing.get_origin(annotation) is tuple:
            return "list", typing.get_args(annotation)[0]
        if annotation in (str, int, float, Path):
            return "value", typing.cast(type[Any], annotation)
        raise TypeError(f"{self.field}: no flag for {annotation!r}")

    def default_text(self) -> str | None:
        if self.flag.default_text is not None:
            return self.flag.default_text
        default = self.info.default
        if default is PydanticUndefined or default is None or default in ((), False):
            return None
        return str(default)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def flagged(model: type[BaseModel]) -> Iterator[FlaggedField]:
    for name, info in model.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is not None:
            yield FlaggedField(name, info, flag)


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per flagged field of ``model``; each defaults to None (the model's default
    applies), or to its environment variable's value."""
    groups: dict[str, Any] = {}
    for item in flagged(model):
        flag = item.flag
        target: Any = parser
        if flag.group is not None:
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            target = groups[flag.group]
        help_text = flag.help
        shown = item.default_text()
        if shown is not None:
            help_text += f" (default: {shown})"
        if flag.env is not None and flag.env not in (shown or ""):
            help_text += f" (or {flag.env})"
        kind, element = item.kind()
        options: dict[str, Any] = {"dest": item.dest, "help": help_text}
        if kind == "bool":
            options.update(action="store_true", default=None)
        else:
            options.update(
                type=element, metavar=flag.metavar, default=os.environ.get(flag.env or "") or None
            )
            if kind == "list":
                options["action"] = "append"
        target.add_argument(flag.name, **options)


def values_from(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The settings the arguments give (fields left out keep the model's default)."""
    values: dict[str, Any] = {}
    for item in flagged(model):
        value = getattr(args, item.dest, None)
        if value is None or value == "":  # (an empty value, say from a chart, is none)
            continue
        values[item.field] = tuple(value) if isinstance(value, list) else value
    return values


def flag_errors(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Each error as ``--flag: message``."""
    names = {item.field: item.flag.name for item in flagged(model)}
    lines = []
    for detail in error.errors():
        location = detail["loc"]
        field = str(location[0]) if location else ""
        message = str(detail["msg"]).removeprefix("Value error, ")
        lines.append(f"{names.get(field, field)}: {message}" if field else message)
    return lines


def markdown_table(model: type[BaseModel]) -> str:
    """The flags as the documentation's table (flag, default, meaning)."""
    rows = ["| flag | default | |", "| --- | --- | --- |"]
    for item in flagged(model):
        flag = item.flag
        name = f"`{flag.name} {flag.metavar}`" if flag.metavar else f"`{flag.name}`"
        if item.kind()[0] == "list":
            name += " (repeatable)"
        if flag.env is not None:
            name += f" (`{flag.env}`)"
        shown = item.default_text()
        if item.kind()[0] == "bool":
            default = "off"
        elif flag.default_text is not None:
            default = flag.default_text  # (prose)
        else:
            default = f"`{shown}`" if shown else "—"
        rows.append(f"| {name} | {default} | {flag.help} |")
    return "\n".join(rows) + "\n"
