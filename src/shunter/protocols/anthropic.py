"""The Anthropic Messages API (``POST /v1/messages``) as the gateway needs it: its error
envelope, and a Messages request read as a chat for the workers the gateway tokenizes for.

Errors on ``/v1/messages`` are answered in Anthropic's shape,
``{"type": "error", "error": {"type": "not_found_error", "message": ...}}``, because the
clients of that endpoint are Anthropic clients: the ``anthropic`` SDK reads
``error.message`` (the same path as in the OpenAI envelope) and its users branch on
``error.type``. The gateway's snake_case code still travels in ``X-SMG-Error-Code``, so
metrics and logs read every endpoint's errors the same way.

The conversion keeps what a chat template can render: the ``system`` prompt (a string or
text blocks) and the messages' text blocks. Any other block (images, tool use, tool
results) is refused with a 400 naming it, as are ``tools``: a gRPC worker's reply is made
by the gateway, which does not turn tool calls into ``tool_use`` blocks.
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.protocols.errors import ApiError, flag, invalid_request, json_object
from shunter.protocols.generation import MESSAGES, GenerationRequest, sampling_from
from shunter.protocols.reply import JSON_CONTENT, Reply

MESSAGES_PATH = "/v1/messages"

# Anthropic's error types by HTTP status; any other status maps by its class.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}}
    )


def anthropic_error_reply(error: ApiError) -> Reply:
    """The Anthropic envelope of ``error``, its code in ``X-SMG-Error-Code`` as elsewhere."""
    headers = [JSON_CONTENT, (b"x-smg-error-code", error.code.encode()), *error.headers]
    return Reply(error.status, headers, anthropic_error_body(error.status, error.message))


def anthropic_stream_error(message: str) -> bytes:
    """The SSE event that tells a Messages client its stream failed after the status."""
    return b"event: error\ndata: " + anthropic_error_body(502, message) + b"\n\n"


# --- a Messages request as a chat --------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """The text of a string or a list of text blocks; any other block is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"'{where}' must be a string or a list of content blocks")
    texts = []
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid_request(f"each block of '{where}' must be an object with a 'type'")
        if block["type"] != "text":
            raise invalid_request(
                f"'{where}' has a '{block['type']}' block: only text blocks are supported "
                "for this model's workers (the gateway renders their prompt)"
            )
        text = block.get("text")
        if not isinstance(text, str):
            raise invalid_request(f"a text block of '{where}' needs a string 'text'")
        texts.append(text)
    return "".join(texts)


def chat_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a Messages body: the system prompt first, then each turn's text."""
    chat: list[dict[str, Any]] = []
    system = data.get("system")
    if system is not None:
        chat.append({"role": "system", "content": _text_of(system, "system")})
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid_request(
                f"messages[{i}] must be an object whose 'role' is user or assistant"
            )
        content = _text_of(message.get("content"), f"messages[{i}].content")
        chat.append({"role": message["role"], "content": content})
    return chat


def parse_messages_request(body: bytes) -> GenerationRequest:
    """A Messages body as the chat request the gRPC pipeline runs; a 400 if malformed."""
    data = json_object(body)
    model = data.get("model") if isinstance(data.get("model"), str) else None
    stream = flag(data, "stream", False)
    max_tokens = data.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise invalid_request("'max_tokens' is required: an integer >= 1")
    if data.get("tools"):
        raise invalid_request(
            "'tools' are not supported on /v1/messages for this model's workers "
            "(gRPC: the gateway renders their output)"
        )
    stops = data.get("stop_sequences")
    params = {
        "max_tokens": max_tokens,
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "top_k": data.get("top_k"),
        "stop": stops,
    }
    try:
        sampling = sampling_from(params, "max_tokens")
    except ApiError as exc:  # name the Messages field, not the chat one
        raise invalid_request(exc.message.replace("'stop'", "'stop_sequences'")) from None
    messages = chat_messages(data)
    # Reasoning stays in the text: a Messages reply made here has text blocks only.
    return GenerationRequest(
        MESSAGES, model, bool(stream), sampling, messages=messages, separate_reasoning=False
    )


# --- the answer's wire format (the gRPC backend's renderer and the sim write it alike) -----


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One Messages stream event: ``event: <name>`` and its ``data:`` line."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def message_object(
    message_id: str,
    model: str | None,
    content: list[Any],
    stop: tuple[str | None, str | None],
    usage: dict[str, Any],
) -> dict[str, Any]:
    """A whole Messages answer (also ``message_start``'s ``message``, with no content and
    no stop yet); ``stop`` is ``(stop_reason, stop_sequence)``."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": usage,
    }
