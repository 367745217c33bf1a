"""An inference request as the router sees it: what the API read off the wire, plus the
fields routing needs, decoded once (``protocols/routing.py``) and reused by every retry.

The router notes on it the model it was routed for and the last worker tried, so that a
request that fails is still counted and logged with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shunter.fleet.worker import Worker
from shunter.protocols.reply import Headers
from shunter.protocols.routing import RequestFields, decode_routing_fields


@dataclass(slots=True)
class InferenceRequest:
    method: str
    path: str
    query: bytes
    headers: Headers  # as received (lower-case names), less the gateway's own credential
    body: bytes
    request_id: str
    started: float = 0.0  # perf_counter() when the request arrived
    fields: RequestFields = field(init=False)
    model: str = field(init=False, default="unknown")  # the registry's model id, once selected
    worker: str | None = field(init=False, default=None)  # the last worker tried
    span: Any = field(init=False, default=None)  # its tracing span (``route``), if tracing
    # A Responses API request (``responses.py``): served by HTTP workers only, and first by
    # the worker that holds the conversation it continues, while that one is available.
    http_only: bool = field(init=False, default=False)
    held_by: Worker | None = field(init=False, default=None)
    _text: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.fields = decode_routing_fields(self.body)  # a 400 ApiError when malformed

    @property
    def stream(self) -> bool:
        return bool(self.fields.stream)

    @property
    def routing_text(self) -> str:
        """The text a prefix-aware policy routes on, joined once per request."""
        if self._text is None:
            self._text = self.fields.routing_text()
        return self._text
