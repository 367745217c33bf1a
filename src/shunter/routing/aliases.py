"""``--model-alias alias=canonical``: a request for ``alias`` is served as ``canonical``.

A client asking for the alias is routed to the canonical model's workers, and the body the
worker receives names the canonical model: a worker answers only for a model it serves
(vLLM's 404 ``The model `alias` does not exist``), and smg sends the canonical id too. Only
an aliased request pays for the rewrite (the body decoded and encoded once, its other
fields unchanged); any other request pays one dict lookup. ``/v1/models`` lists each alias
of a served model beside it, its ``root`` the canonical name.

Aliases are checked at start (a malformed value, an alias of itself, an alias given two
targets, an alias of an alias). Which models the workers serve is known only as they
register: a worker serving a model named as an alias is logged as a warning, and the alias
still wins, so that what a name means does not change with the fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from shunter.fleet.worker import Worker
from shunter.routing.request import InferenceRequest

log = logging.getLogger("shunter.router")


class AliasError(ValueError):
    """A ``--model-alias`` value that cannot be used; the message says why."""


def parse_aliases(values: Iterable[str]) -> dict[str, str]:
    """``alias=canonical`` values as a dict, checked."""
    aliases: dict[str, str] = {}
    for value in values:
        alias, sep, canonical = (part.strip() for part in value.partition("="))
        if not sep or not alias or not canonical:
            raise AliasError(f"--model-alias {value!r}: give ALIAS=CANONICAL_MODEL")
        if alias == canonical:
            raise AliasError(f"--model-alias {value!r}: a model cannot be its own alias")
        if aliases.get(alias, canonical) != canonical:
            raise AliasError(
                f"--model-alias {alias}: given twice, for {aliases[alias]} and {canonical}"
            )
        aliases[alias] = canonical
    for alias, canonical in aliases.items():
        if canonical in aliases:
            raise AliasError(
                f"--model-alias {alias}={canonical}: {canonical} is itself an alias (of "
                f"{aliases[canonical]}); name the served model"
            )
    return aliases


class ModelAliases:
    __slots__ = ("aliases",)

    def __init__(self, aliases: Mapping[str, str]) -> None:
        self.aliases = dict(aliases)

    def resolve(self, request: InferenceRequest) -> None:
        """If ``request`` names an alias: name the canonical model, in its fields and its
        body."""
        model = request.fields.model
        canonical = self.aliases.get(model) if model is not None else None
        if canonical is None:
            return
        request.body = with_model(request.body, canonical)
        request.fields.model = canonical

    def listed(self, served: Sequence[str]) -> list[dict[str, Any]]:
        """``/v1/models`` entries for the aliases of the ``served`` models."""
        return [
            {"id": alias, "object": "model", "owned_by": "local", "root": canonical}
            for alias, canonical in self.aliases.items()
            if canonical in served
        ]

    def fleet_changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        for worker in added:
            for model in worker.model_ids:
                if model in self.aliases:
                    log.warning(
                        "a worker serves a model named as an alias; requests for that name "
                        "still go to the alias's model",
                        extra={"url": worker.url, "model": model, "alias_of": self.aliases[model]},
                    )


def with_model(body: bytes, model: str) -> bytes:
    """``body`` (a JSON object) with its ``model`` set to ``model``, the rest unchanged
    (msgspec keeps integers of any size, where orjson would turn a big one into a float)."""
    value = msgspec.json.decode(body)
    value["model"] = model
    return msgspec.json.encode(value)
