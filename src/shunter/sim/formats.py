"""Response shapes of the endpoints the sim serves: OpenAI chat and completions, SGLang generate.

Each format turns the engine's tokens into the JSON a real server sends, whole or as SSE.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from shunter.sim.engine import Generation


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(generation: Generation) -> dict[str, Any]:
    prompt = len(generation.prompt_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": prompt + generation.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


class Format:
    """Base: one response id and creation time per request.

    ``index`` is an item's place in a batch (several prompts, or n > 1), None for a single
    request. ``input_logprobs``, when given, goes into SGLang's ``meta_info`` as
    ``input_token_logprobs`` (a PD leg asked for ``return_logprob``).
    """

    prefix = "cmpl-"

    def __init__(
        self,
        model: str,
        include_usage: bool = False,
        *,
        index: int | None = None,
        input_logprobs: list[Any] | None = None,
    ) -> None:
        self.id = self.prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.index = index
        self.input_logprobs = input_logprobs

    @property
    def choice_index(self) -> int:
        return self.index or 0

    def first_chunk(self) -> bytes | None:
        return None

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        raise NotImplementedError

    def finish_chunks(self, generation: Generation) -> list[bytes]:
        """What ends this item's stream, before any usage chunk and ``[DONE]``."""
        return []

    def usage_chunk(self, generation: Generation) -> bytes | None:
        """The streamed usage, when the request asked for it."""
        return None

    def final_chunks(self, generation: Generation) -> list[bytes]:
        usage_chunk = self.usage_chunk(generation)
        tail = [usage_chunk] if usage_chunk is not None else []
        return [*self.finish_chunks(generation), *tail, SSE_DONE]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormat(Format):
    prefix = "chatcmpl-"

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": self.choice_index, "delta": delta, "finish_reason": finish}],
        }

    def first_chunk(self) -> bytes:
        return sse(self._chunk({"role": "assistant", "content": ""}, None))

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        piece = token if generation.completion_tokens == 1 else " " + token
        return sse(self._chunk({"content": piece}, None))

    def finish_chunks(self, generation: Generation) -> list[bytes]:
        return [sse(self._chunk({}, generation.finish_reason))]

    def usage_chunk(self, generation: Generation) -> bytes | None:
        if not self.include_usage:
            return None
        last = self._chunk({}, None)
        last["choices"] = []
        last["usage"] = usage(generation)
        return sse(last)

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": self.choice_index,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": usage(generation),
        }


class CompletionFormat(Format):
    def _body(self, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": self.choice_index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        piece = token if generation.completion_tokens == 1 else " " + token
        return sse(self._body(piece, None))

    def finish_chunks(self, generation: Generation) -> list[bytes]:
        return [sse(self._body("", generation.finish_reason))]

    def usage_chunk(self, generation: Generation) -> bytes | None:
        if not self.include_usage:
            return None
        last = self._body("", None)
        last["choices"] = []
        last["usage"] = usage(generation)
        return sse(last)

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        body = self._body(text, generation.finish_reason)
        body["usage"] = usage(generation)
        return body


class GenerateFormat(Format):
    """SGLang's native /generate: cumulative text in every streamed chunk, with meta_info."""

    prefix = ""

    def _meta(self, generation: Generation, finished: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.id,
            "prompt_tokens": len(generation.prompt_tokens),
            "completion_tokens": generation.completion_tokens,
            "cached_tokens": generation.cached_tokens,
            "finish_reason": (
                {"type": "length", "length": generation.completion_tokens} if finished else None
            ),
        }
        if self.input_logprobs is not None:
            meta["input_token_logprobs"] = self.input_logprobs
        return meta

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        last = generation.completion_tokens >= generation.max_tokens
        event: dict[str, Any] = {"text": text_so_far, "meta_info": self._meta(generation, last)}
        if self.index is not None:  # a batch's items share one stream, told apart by index
            event["index"] = self.index
        return sse(event)

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        return {"text": text, "meta_info": self._meta(generation, True)}
