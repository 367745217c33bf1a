"""A gRPC worker's output as an Anthropic Messages response, whole or as its SSE events.

The same interface as ``OutputFormat`` (``output.py``), which the pipeline calls. A stream
is ``message_start``, ``content_block_start`` (one text block), a ``content_block_delta``
per piece of text, then ``content_block_stop``, ``message_delta`` (the stop reason and the
usage) and ``message_stop``; no ``[DONE]``. ``message_start`` waits for the first text (or
the end), so that its usage carries the prompt's token count, which the worker reports with
its first message.

Stop reasons: a stop sequence of the request is ``stop_sequence`` (and named), the model's
own end ``end_turn``, the token limit ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.backends.grpc.output import Delta, OutputSequence, Usage
from shunter.protocols.anthropic import message_object, sse_event
from shunter.protocols.generation import GenerationRequest


class MessagesFormat:
    done: bytes | None = None  # Messages streams end with message_stop, not [DONE]

    def __init__(
        self, request: GenerationRequest, request_id: str, model: str, usage: Usage
    ) -> None:
        self.id = "msg_" + request_id
        self.model = model
        self.stops = frozenset(request.sampling.stop)
        self.usage = usage  # the call's, filled in as the worker's messages arrive
        self.started = False

    def _stop(self, sequence: OutputSequence) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence) of a finished sequence."""
        if sequence.finish_reason == "length":
            return "max_tokens", None
        matched = sequence.matched
        if isinstance(matched, str) and matched in self.stops:
            return "stop_sequence", matched
        return "end_turn", None

    def _usage(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
        }

    def _message(
        self, content: list[dict[str, Any]], stop: tuple[str | None, str | None]
    ) -> dict[str, Any]:
        return message_object(self.id, self.model, content, stop, self._usage())

    # --- whole --------------------------------------------------------------------------

    def whole(self, sequences: list[OutputSequence], usage: Usage) -> bytes:
        sequence = sequences[0]
        content = [{"type": "text", "text": sequence.text}] if sequence.text else []
        return orjson.dumps(self._message(content, self._stop(sequence)))

    # --- stream events ------------------------------------------------------------------

    def role_chunk(self, index: int) -> bytes | None:
        return None  # message_start waits for the prompt's count (the module's docstring)

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        start = self._message([], (None, None))
        start["usage"]["output_tokens"] = 0
        block = {"type": "text", "text": ""}
        return sse_event("message_start", {"type": "message_start", "message": start}) + sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )

    def delta_chunk(self, sequence: OutputSequence, delta: Delta) -> bytes | None:
        if not delta.content:
            return None
        text = {"type": "text_delta", "text": delta.content}
        return self._start() + sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": text}
        )

    def finish_chunk(self, sequence: OutputSequence) -> bytes | None:
        reason, matched = self._stop(sequence)
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": matched},
            "usage": self._usage(),
        }
        return (
            self._start()
            + sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse_event("message_delta", message_delta)
            + sse_event("message_stop", {"type": "message_stop"})
        )

    def usage_chunk(self, usage: Usage) -> bytes:
        return b""  # the usage went out with message_delta

    def generate_state(self, sequence: OutputSequence, usage: Usage) -> bytes:
        raise AssertionError("a Messages request is never /generate")
