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
    """Base: one response id and creation time per request."""

    prefix = "cmpl-"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = self.prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def first_chunk(self) -> bytes | None:
        return None

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        raise NotImplementedError

    def final_chunks(self, generation: Generation) -> list[bytes]:
        raise NotImplementedError

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
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def first_chunk(self) -> bytes:
        return sse(self._chunk({"role": "assistant", "content": ""}, None))

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        piece = token if generation.completion_tokens == 1 else " " + token
        return sse(self._chunk({"content": piece}, None))

    def final_chunks(self, generation: Generation) -> list[bytes]:
        chunks = [sse(self._chunk({}, generation.finish_reason))]
        if self.include_usage:
            last = self._chunk({}, None)
            last["choices"] = []
            last["usage"] = usage(generation)
            chunks.append(sse(last))
        return [*chunks, SSE_DONE]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
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
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        piece = token if generation.completion_tokens == 1 else " " + token
        return sse(self._body(piece, None))

    def final_chunks(self, generation: Generation) -> list[bytes]:
        chunks = [sse(self._body("", generation.finish_reason))]
        if self.include_usage:
            last = self._body("", None)
            last["choices"] = []
            last["usage"] = usage(generation)
            chunks.append(sse(last))
        return [*chunks, SSE_DONE]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        body = self._body(text, generation.finish_reason)
        body["usage"] = usage(generation)
        return body


class GenerateFormat(Format):
    """SGLang's native /generate: cumulative text in every streamed chunk, with meta_info."""

    prefix = ""

    def _meta(self, generation: Generation, finished: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt_tokens": len(generation.prompt_tokens),
            "completion_tokens": generation.completion_tokens,
            "cached_tokens": generation.cached_tokens,
            "finish_reason": (
                {"type": "length", "length": generation.completion_tokens} if finished else None
            ),
        }

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        last = generation.completion_tokens >= generation.max_tokens
        return sse({"text": text_so_far, "meta_info": self._meta(generation, last)})

    def final_chunks(self, generation: Generation) -> list[bytes]:
        return [SSE_DONE]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        return {"text": text, "meta_info": self._meta(generation, True)}
