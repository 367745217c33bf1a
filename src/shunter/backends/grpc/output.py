"""From token ids to OpenAI (or SGLang /generate) output, for one request to a gRPC worker.

Per output sequence (``n`` of them): incremental detokenization, stop strings and stop
token ids, then the reasoning and tool-call parsers; the result is deltas for streaming and
the accumulated texts for a whole response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from shunter.parsers.reasoning import REASONING_PARSERS, ReasoningParser
from shunter.parsers.tool_calls import TOOL_CALL_PARSERS, ToolCall, ToolCallParser
from shunter.protocols.generation import CHAT, COMPLETION, GenerationRequest
from shunter.tokenizer.detokenize import IncrementalDetokenizer
from shunter.tokenizer.stop import StopStrings
from shunter.tokenizer.tokenizer import ModelTokenizer


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class OutputSequence:
    """One output sequence: its text so far, and the finish once it has one."""

    def __init__(
        self,
        index: int,
        tokenizer: ModelTokenizer,
        request: GenerationRequest,
        stop_ids: frozenset[int],
        reasoning: str | None,
        tool_parser: str | None,
    ) -> None:
        sampling = request.sampling
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer, sampling.skip_special_tokens)
        self.stops = StopStrings(sampling.stop, sampling.no_stop_trim)
        self.stop_ids = stop_ids
        self.trim_stop_ids = not sampling.no_stop_trim
        style = REASONING_PARSERS.get(reasoning or "")
        self.reasoning = ReasoningParser(style) if style and request.separate_reasoning else None
        tools = TOOL_CALL_PARSERS.get(tool_parser or "") if request.tools else None
        self.tools = ToolCallParser(tools) if tools else None
        self.text = ""
        self.reasoning_text = ""
        self.tool_calls: list[ToolCall] = []
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.completed = False  # the worker sent its end (not only the gateway's stop)
        self.matched: int | str | None = None
        self.completion_tokens = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, ids: list[int]) -> Delta:
        """Text for new token ids; a stop string sets the finish (the caller then stops)."""
        if self.done:
            return Delta()
        self.output_ids += ids
        if self.trim_stop_ids:
            ids = [i for i in ids if i not in self.stop_ids]
        text = self.stops.feed(self.detok.add(ids))
        if self.stops.stopped:
            self.finish_reason, self.matched = "stop", self.stops.matched
        return self._emit(text, final=self.done)

    def finish(self, reason: str, matched: int | str | None) -> Delta:
        """The worker finished this sequence: flush what was held back."""
        self.completed = True
        if self.done:
            return Delta()
        text = self.stops.feed(self.detok.flush())
        text += self.stops.flush()
        self.finish_reason = "stop" if self.stops.stopped else reason
        self.matched = self.stops.matched if self.stops.stopped else matched
        return self._emit(text, final=True)

    def _emit(self, text: str, final: bool) -> Delta:
        """Run the parsers over new text; at the end, flush them too."""
        delta = Delta()
        if self.reasoning is not None:
            delta.reasoning, text = self.reasoning.feed(text)
            if final:
                reasoning, content = self.reasoning.flush()
                delta.reasoning += reasoning
                text += content
        if self.tools is not None:
            delta.content, delta.tool_calls = self.tools.feed(text)
            if final:
                content, calls = self.tools.flush()
                delta.content += content
                delta.tool_calls += calls
        else:
            delta.content = text
        self.text += delta.content
        self.reasoning_text += delta.reasoning
        self.tool_calls += delta.tool_calls
        return delta

    @property
    def openai_finish(self) -> str | None:
        if self.tool_calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class OutputFormat:
    """The response shapes of one endpoint (chat, completion or /generate)."""

    done: bytes | None = b"data: [DONE]\n\n"  # what ends a stream

    def __init__(self, request: GenerationRequest, request_id: str, model: str) -> None:
        self.kind = request.kind
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.object = {CHAT: "chat.completion", COMPLETION: "text_completion"}.get(self.kind, "")

    # --- whole responses ------------------------------------------------------------------

    def whole(self, sequences: list[OutputSequence], usage: Usage) -> bytes:
        if self.kind == CHAT:
            choices = [self._chat_choice(s) for s in sequences]
        elif self.kind == COMPLETION:
            choices = [
                {
                    "index": s.index,
                    "text": s.text,
                    "logprobs": None,
                    "finish_reason": s.finish_reason,
                }
                for s in sequences
            ]
        else:
            items = [self._generate_item(s, usage) for s in sequences]
            return orjson.dumps(items[0] if len(items) == 1 else items)
        return orjson.dumps(
            {
                "id": self.request_id,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": usage.as_dict(),
            }
        )

    def _chat_choice(self, sequence: OutputSequence) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": sequence.text or None}
        if sequence.reasoning is not None:
            message["reasoning_content"] = sequence.reasoning_text or None
        if sequence.tool_calls:
            message["tool_calls"] = [c.as_dict() for c in sequence.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return {
            "index": sequence.index,
            "message": message,
            "finish_reason": sequence.openai_finish,
            "matched_stop": sequence.matched,
        }

    def _generate_item(self, sequence: OutputSequence, usage: Usage) -> dict[str, Any]:
        finish: dict[str, Any] | None = None
        if sequence.finish_reason == "length":
            finish = {"type": "length", "length": sequence.completion_tokens}
        elif sequence.finish_reason is not None:
            finish = {"type": sequence.finish_reason, "matched": sequence.matched}
        return {
            "text": sequence.text,
            "output_ids": sequence.output_ids,
            "meta_info": {
                "id": self.request_id,
                "finish_reason": finish,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": sequence.completion_tokens,
                "cached_tokens": usage.cached_tokens,
            },
        }

    # --- stream chunks --------------------------------------------------------------------

    def role_chunk(self, index: int) -> bytes | None:
        if self.kind != CHAT:
            return None
        return self._chunk(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def delta_chunk(self, sequence: OutputSequence, delta: Delta) -> bytes | None:
        if self.kind == CHAT:
            body: dict[str, Any] = {}
            if delta.content:
                body["content"] = delta.content
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.tool_calls:
                first = len(sequence.tool_calls) - len(delta.tool_calls)
                body["tool_calls"] = [c.as_dict(first + i) for i, c in enumerate(delta.tool_calls)]
            if not body:
                return None
            return self._chunk([{"index": sequence.index, "delta": body, "finish_reason": None}])
        if self.kind == COMPLETION:
            if not delta.content:
                return None
            return self._chunk(
                [
                    {
                        "index": sequence.index,
                        "text": delta.content,
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        return None  # /generate streams whole states, at finish and per token (generate_state)

    def generate_state(self, sequence: OutputSequence, usage: Usage) -> bytes:
        """SGLang's /generate streams the text so far with each event."""
        item = self._generate_item(sequence, usage)
        item["index"] = sequence.index
        return b"data: " + orjson.dumps(item) + b"\n\n"

    def finish_chunk(self, sequence: OutputSequence) -> bytes | None:
        if self.kind == CHAT:
            return self._chunk(
                [
                    {
                        "index": sequence.index,
                        "delta": {},
                        "finish_reason": sequence.openai_finish,
                        "matched_stop": sequence.matched,
                    }
                ]
            )
        if self.kind == COMPLETION:
            return self._chunk(
                [
                    {
                        "index": sequence.index,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": sequence.finish_reason,
                    }
                ]
            )
        return None

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage.as_dict())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": self.object + ".chunk" if self.kind == CHAT else self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"
