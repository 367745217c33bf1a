"""An inference request as the gRPC path needs it: prompt, sampling parameters, output shape.

Built from the JSON of ``/v1/chat/completions``, ``/v1/completions`` or ``/generate``. The
sampling parameters get SGLang's defaults explicitly, because a proto3 field left out reads
as 0, which is not SGLang's default for temperature (1), top_p (1) or top_k (-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from shunter.protocols.errors import flag, invalid_request, json_object

CHAT, COMPLETION, GENERATE = "chat", "completion", "generate"
MESSAGES = "messages"  # Anthropic's /v1/messages: a chat (protocols/anthropic.py)
KIND_OF_PATH = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETION,
    "/generate": GENERATE,
}


@dataclass
class Sampling:
    """SGLang's SamplingParams, defaults included."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def as_proto_fields(self) -> dict[str, Any]:
        """The fields of ``SamplingParams``; the unset optional ones are left out."""
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        if "ebnf" in fields:
            fields["ebnf_grammar"] = fields.pop("ebnf")  # the proto's name for it
        return fields


@dataclass
class GenerationRequest:
    kind: str  # CHAT, COMPLETION, GENERATE or MESSAGES
    model: str | None
    stream: bool
    sampling: Sampling
    messages: list[dict[str, Any]] | None = None  # chat
    tools: list[Any] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None  # completion / generate
    input_ids: list[int] | None = None  # generate with ids
    include_usage: bool = False  # streamed usage chunk (stream_options.include_usage)
    separate_reasoning: bool = True


# --- field readers -----------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid_request(f"'{key}' must be a number between {low} and {high}")
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise invalid_request(f"'{key}' must be an integer >= {low}")
    return value


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise invalid_request("'stop' must be a string or a list of strings")


def _token_ids(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        return list(value)
    raise invalid_request(f"'{key}' must be a list of token ids")


def sampling_from(params: dict[str, Any], max_tokens_key: str) -> Sampling:
    """Sampling parameters from OpenAI fields (or /generate's sampling_params)."""
    sampling = Sampling(
        temperature=_number(params, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(params, "top_p", 1.0, 0.0, 1.0),
        # 0 means "off" to OpenAI-style clients, as -1 does to SGLang
        top_k=_integer(params, "top_k", -1, -1) or -1,
        min_p=_number(params, "min_p", 0.0, 0.0, 1.0),
        frequency_penalty=_number(params, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(params, "presence_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(params, "repetition_penalty", 1.0, 0.0, 2.0),
        max_new_tokens=_integer(params, max_tokens_key, None, 0),
        min_new_tokens=_integer(params, "min_tokens", 0, 0)
        or _integer(params, "min_new_tokens", 0, 0)
        or 0,
        stop=_stops(params.get("stop")),
        stop_token_ids=_token_ids(params.get("stop_token_ids"), "stop_token_ids"),
        ignore_eos=flag(params, "ignore_eos", False),
        no_stop_trim=flag(params, "no_stop_trim", False),
        skip_special_tokens=flag(params, "skip_special_tokens", True),
        spaces_between_special_tokens=flag(params, "spaces_between_special_tokens", True),
        n=_integer(params, "n", 1, 1) or 1,
    )
    if sampling.n > 128:
        raise invalid_request("'n' must be at most 128")
    for key in ("regex", "json_schema", "ebnf"):
        value = params.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise invalid_request(f"'{key}' must be a string")
            setattr(sampling, key, value)
    return sampling


def _response_format(body: dict[str, Any], sampling: Sampling) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise invalid_request("'response_format' must be an object")
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise invalid_request("'response_format.json_schema.schema' must be an object")
        sampling.json_schema = orjson.dumps(schema).decode()
    elif fmt.get("type") == "json_object":
        sampling.json_schema = '{"type": "object"}'


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid_request("'messages' must be a non-empty list")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request("each message must be an object with a 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            ]
            message = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise invalid_request("a message's 'content' must be a string or a list of parts")
        messages.append(message)
    return messages


def parse_generation_request(path: str, body: bytes) -> GenerationRequest:
    """The request behind ``body`` for ``path``; a 400 ApiError if it is malformed."""
    data = json_object(body)
    kind = KIND_OF_PATH[path]
    model = data.get("model") if isinstance(data.get("model"), str) else None
    stream = flag(data, "stream", False)
    options = data.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if kind == GENERATE:
        return _generate_request(data, model, stream)
    sampling = sampling_from(
        data,
        "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens",
    )
    _response_format(data, sampling)
    if kind == CHAT:
        tools = data.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise invalid_request("'tools' must be a list")
        kwargs = data.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise invalid_request("'chat_template_kwargs' must be an object")
        return GenerationRequest(
            CHAT,
            model,
            stream,
            sampling,
            messages=_messages(data.get("messages")),
            tools=tools if data.get("tool_choice") != "none" else None,
            template_kwargs=kwargs,
            include_usage=include_usage,
            separate_reasoning=flag(data, "separate_reasoning", True),
        )
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return GenerationRequest(
            COMPLETION, model, stream, sampling, input_ids=prompt, include_usage=include_usage
        )
    if not isinstance(prompt, str):
        raise invalid_request("'prompt' must be a string, a one-string list or a list of token ids")
    return GenerationRequest(
        COMPLETION, model, stream, sampling, text=prompt, include_usage=include_usage
    )


def _generate_request(data: dict[str, Any], model: str | None, stream: bool) -> GenerationRequest:
    params = data.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise invalid_request("'sampling_params' must be an object")
    sampling = sampling_from(params, "max_new_tokens")
    if isinstance(data.get("input_ids"), list):
        ids = _token_ids(data["input_ids"], "input_ids")
        if not ids:
            raise invalid_request("'input_ids' is empty")
        return GenerationRequest(GENERATE, model, stream, sampling, input_ids=ids)
    text = data.get("text")
    if not isinstance(text, str):
        raise invalid_request(
            "give 'text' (a string) or 'input_ids'; batches are not supported over gRPC"
        )
    return GenerationRequest(GENERATE, model, stream, sampling, text=text)
