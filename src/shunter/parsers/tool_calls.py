"""Tool-call parsers: find function calls in a model's output, whole or streamed.

- ``json``: the output is a JSON call, ``{"name": ..., "arguments"|"parameters": {...}}``,
  or a list of them;
- ``qwen`` (alias ``hermes``): calls wrapped in ``<tool_call>…</tool_call>`` tags, each a
  JSON call; text outside the tags is content.

Streaming: content is released as it comes, except what may be the start of a call; a call
is released as one ``tool_calls`` delta once its JSON is complete (``arguments`` in one
piece, which the OpenAI protocol allows).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from shunter.tokenizer.stop import partial_tag

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _call_of(value: Any) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], text, f"call_{uuid.uuid4().hex[:24]}")


def _calls_in_json(text: str) -> list[ToolCall] | None:
    """The calls ``text`` holds as JSON, or None if it is not a call (or list of calls)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


class ToolCallParser:
    """Per request: ``feed`` text, get (content, calls) back; ``flush`` at the end."""

    def __init__(self, style: str) -> None:
        self.style = style
        self._buffer = ""
        self._in_call = False
        self._json_mode: bool | None = None  # json style: is the output a call at all?

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        return self._feed_json() if self.style == "json" else self._feed_tags()

    def _feed_json(self) -> tuple[str, list[ToolCall]]:
        if self._json_mode is None:
            stripped = self._buffer.lstrip()
            if not stripped:
                return "", []
            self._json_mode = stripped[0] in "{["
        if self._json_mode:
            return "", []  # held whole: decided at flush
        content, self._buffer = self._buffer, ""
        return content, []

    def _feed_tags(self) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        found: list[ToolCall] = []
        while self._buffer:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
                self._in_call = False
                calls = _calls_in_json(body.strip())
                if calls is None:  # not a call after all: give the text back as content
                    content.append(OPEN + body + CLOSE)
                else:
                    found += calls
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                content.append(self._buffer[:start])
                self._buffer, self._in_call = self._buffer[start + len(OPEN) :], True
                continue
            hold = partial_tag(self._buffer, OPEN)
            content.append(self._buffer[: len(self._buffer) - hold])
            self._buffer = self._buffer[len(self._buffer) - hold :]
            break
        return "".join(content), found

    def flush(self) -> tuple[str, list[ToolCall]]:
        held, self._buffer = self._buffer, ""
        if self.style == "json" and self._json_mode:
            calls = _calls_in_json(held.strip())
            if calls is not None:
                return "", calls
            return held, []
        return (OPEN + held if self._in_call else held), []


TOOL_CALL_PARSERS = {"json": "json", "qwen": "tags", "hermes": "tags", "qwen25": "tags"}
