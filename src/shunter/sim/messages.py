"""The sim's Anthropic Messages API and tokenize endpoints, as an SGLang server serves them.

``POST /v1/messages`` runs on the same engine as chat (slots, prefix cache, faults, the
``/sim/requests`` record): the system prompt and the messages' text blocks become the sim's
chat prompt (``chat_text``), and the answer is a Messages response, or its SSE events
(``message_start`` … ``message_stop``). The sim's output always ends on its token limit, so
``stop_reason`` is ``max_tokens``.

``POST /v1/tokenize`` and ``/v1/detokenize`` use the sim's tokenizer: whitespace words as
ids (``tokenizer/words.py``), the count its usage reports. Ids map back through the sim's
vocabulary (the words it generates), a decimal word being its own id; any other word's id
(a CRC-32, which nothing inverts) comes back as that number, as a fixed vocabulary would
give an unknown token. Every sim detokenizes alike, whichever tokenized.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shunter.protocols.anthropic import message_object, sse_event
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import JSON_CONTENT
from shunter.protocols.tokenize import (
    detokenize_answer,
    parse_detokenize,
    parse_tokenize,
    tokenize_answer,
)
from shunter.sim.engine import WORDS, Generation, tokenize
from shunter.sim.formats import Format
from shunter.sim.request import BadRequest, Request, max_tokens_of
from shunter.sim.send import send_bytes
from shunter.tokenizer.words import chat_text, word_id

if TYPE_CHECKING:
    from shunter.sim.app import SimApp

MAX_MODEL_LEN = 32768  # what the sim's model info and gRPC sim report


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(b.get("text", ""))
            for b in content
            if isinstance(b, dict) and b.get("type") == "text"
        )
    raise BadRequest("a message's 'content' must be a string or a list of content blocks")


def messages_prompt(body: dict[str, Any]) -> str:
    """The sim's prompt for a Messages body: its chat prompt, the system prompt first."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    chat = [] if body.get("system") is None else [{"role": "system", "content": ""}]
    if chat:
        chat[0]["content"] = _text(body["system"])
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        chat.append({"role": message.get("role", "user"), "content": _text(message.get("content"))})
    return chat_text(chat)


class MessagesFormat(Format):
    """Anthropic's Messages response, whole or as its SSE events."""

    prefix = "msg_"

    def _usage(self, generation: Generation) -> dict[str, Any]:
        return {
            "input_tokens": len(generation.prompt_tokens),
            "output_tokens": generation.completion_tokens,
            "cache_read_input_tokens": generation.cached_tokens,
        }

    def _message(self, content: list[Any], generation: Generation, stop: str | None) -> Any:
        return message_object(self.id, self.model, content, (stop, None), self._usage(generation))

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        start = b""
        if generation.completion_tokens == 1:  # sent once the prompt is counted
            message = self._message([], generation, None)
            message["usage"]["output_tokens"] = 0
            block = {"type": "content_block_start", "index": 0, "content_block": _EMPTY}
            start = sse_event("message_start", {"type": "message_start", "message": message})
            start += sse_event("content_block_start", block)
        piece = token if generation.completion_tokens == 1 else " " + token
        delta = {"type": "text_delta", "text": piece}
        return start + sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )

    def final_chunks(self, generation: Generation) -> list[bytes]:
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": self._usage(generation),
        }
        return [
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_event("message_delta", end),
            sse_event("message_stop", {"type": "message_stop"}),
        ]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        content = [{"type": "text", "text": text}] if text else []
        return dict(self._message(content, generation, "max_tokens"))


_EMPTY = {"type": "text", "text": ""}


class MessagesEndpoints:
    """The routes, bound to one sim."""

    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.words: dict[int, str] = {word_id(w): w for w in WORDS}

    def routes(self, runtime: str) -> dict[str, Callable[[Request], Awaitable[None]]]:
        """What the runtime's server has: SGLang all three, vLLM the Messages API (its
        tokenize API is elsewhere), the others none."""
        if runtime == "sglang":
            return {
                "/v1/messages": self.messages,
                "/v1/tokenize": self.tokenize,
                "/v1/detokenize": self.detokenize,
            }
        return {"/v1/messages": self.messages} if runtime == "vllm" else {}

    async def messages(self, request: Request) -> None:
        body = request.json()
        limit = body.get("max_tokens")
        if limit is None or max_tokens_of(limit, 0) < 1:
            raise BadRequest("'max_tokens' is required: an integer >= 1")
        prompt = messages_prompt(body)
        fmt = MessagesFormat(body.get("model") or self.app.config.served_model_name)
        await self.app.respond(request, body, fmt, Generation(tokenize(prompt), limit))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [word_id(word) for word in tokenize(text)]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return " ".join(self.words.get(token, str(token)) for token in ids)

    async def tokenize(self, request: Request) -> None:
        try:
            answer = tokenize_answer(parse_tokenize(request.body), self._encode, MAX_MODEL_LEN)
        except ApiError as exc:
            raise BadRequest(exc.message) from None
        await send_bytes(request.send, 200, answer, [JSON_CONTENT, request.worker_header])

    async def detokenize(self, request: Request) -> None:
        try:
            answer = detokenize_answer(parse_detokenize(request.body), self._decode)
        except ApiError as exc:
            raise BadRequest(exc.message) from None
        await send_bytes(request.send, 200, answer, [JSON_CONTENT, request.worker_header])
