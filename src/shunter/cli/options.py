"""Flags that belong to a config dataclass: declared once, defaults taken from it.

``ConfigFlags(group, SomeConfig(), "retry")`` adds flags whose defaults are the dataclass's
own and whose values land under ``retry.<field>``; ``.build(args)`` makes the dataclass back
from them, by field name. So a default is written in one place (the config object), and a
reordered field can never swap two values.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConfigFlags(Generic[T]):
    def __init__(self, group: Any, defaults: T, prefix: str) -> None:
        self.group = group  # a parser or an argument group
        self.defaults = defaults
        self.prefix = prefix
        self.fields: list[str] = []

    def flag(self, name: str, field: str, *aliases: str, **options: Any) -> None:
        """``name`` (and ``aliases``) sets the dataclass's ``field``."""
        if options.get("action") not in ("store_true", "store_false"):
            options.setdefault("type", type(getattr(self.defaults, field)))
        self.group.add_argument(
            name,
            *aliases,
            dest=f"{self.prefix}.{field}",
            default=getattr(self.defaults, field),
            **options,
        )
        self.fields.append(field)

    def build(self, args: argparse.Namespace, **overrides: Any) -> T:
        values = {field: getattr(args, f"{self.prefix}.{field}") for field in self.fields}
        return dataclasses.replace(self.defaults, **{**values, **overrides})  # type: ignore[type-var]


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
