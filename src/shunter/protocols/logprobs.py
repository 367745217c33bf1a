"""Input logprobs across a prefill/decode pair: the prefill's in front of the decode's.

A client that asks for logprobs (``return_logprob``) expects ``meta_info.input_token_logprobs``
for its whole prompt. In a disaggregated pair the prefill worker computed them and the
decode worker, which relays the answer, has none (or only its own tail): so the prefill's
list goes in front of the decode's, per sequence (``index`` in a batch), in a whole answer
and in every streamed event, as SGLang's own load balancer does.

Only bodies and events that carry ``meta_info`` are touched; anything else (OpenAI-shaped
chunks, ``[DONE]``, comments) passes through byte for byte.
"""

from __future__ import annotations

from typing import Any

import orjson

InputLogprobs = dict[int, list[Any]]  # sequence index -> the prefill's input logprobs
_EVENT_END = b"\n\n"
_DATA = b"data:"


def wants_input_logprobs(fields: Any) -> bool:
    """Whether the request asked for logprobs (``RequestFields.return_logprob``)."""
    value = fields.return_logprob
    return any(bool(v) for v in value) if isinstance(value, list) else bool(value)


def prefill_logprobs(body: bytes) -> InputLogprobs:
    """The input logprobs in a prefill worker's answer: a whole JSON body (an object, or a
    list for a batch) or an SSE stream (the last list seen per sequence)."""
    found: InputLogprobs = {}
    stripped = body.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            payload = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return found
        items = payload if isinstance(payload, list) else [payload]
        for index, item in enumerate(items):
            _collect(found, item, index)
        return found
    for event in body.split(_EVENT_END):
        payload = _event_json(event)
        if payload is not None:
            _collect(found, payload, _index(payload))
    return found


def merged_body(body: bytes, prefill: InputLogprobs) -> bytes:
    """A decode worker's whole JSON answer with the prefill's input logprobs in front."""
    if not prefill:
        return body
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    items = payload if isinstance(payload, list) else [payload]
    changed = False
    for index, item in enumerate(items):
        changed |= _merge(item, prefill, index)
    return orjson.dumps(payload) if changed else body


class EventMerger:
    """Merges the prefill's input logprobs into each event of a decode stream, whatever
    the chunking: complete events are rewritten, a partial one waits for its end."""

    __slots__ = ("_pending", "_prefill")

    def __init__(self, prefill: InputLogprobs) -> None:
        self._prefill = prefill
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        events = data[: end + 2].split(_EVENT_END)[:-1]
        return b"".join(self._event(event) + _EVENT_END for event in events)

    def end(self) -> bytes:
        """Whatever the stream left unterminated, as it was."""
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        payload = _event_json(event)
        if payload is None or not _merge(payload, self._prefill, _index(payload)):
            return event
        return b"data: " + orjson.dumps(payload)


def _event_json(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a one-line ``data:`` event, else None."""
    line = event.strip()
    if not line.startswith(_DATA) or b"\n" in line:
        return None
    data = line[len(_DATA) :].strip()
    if not data.startswith(b"{"):
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _index(payload: dict[str, Any]) -> int:
    index = payload.get("index", 0)
    return index if isinstance(index, int) else 0


def _input_logprobs(item: Any) -> list[Any] | None:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return None
    logprobs = meta.get("input_token_logprobs")
    return logprobs if isinstance(logprobs, list) else None


def _collect(found: InputLogprobs, item: Any, index: int) -> None:
    logprobs = _input_logprobs(item)
    if logprobs:
        found[index] = logprobs


def _merge(item: Any, prefill: InputLogprobs, index: int) -> bool:
    """Put the prefill's list in front of ``item``'s; whether anything changed."""
    ahead = prefill.get(index)
    if not ahead or not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        return False
    meta = item["meta_info"]
    own = meta.get("input_token_logprobs")
    meta["input_token_logprobs"] = ahead + (own if isinstance(own, list) else [])
    return True
