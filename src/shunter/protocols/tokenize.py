"""``POST /v1/tokenize`` and ``/v1/detokenize``: their requests checked, their answers made.

The shapes are SGLang's (which follow vLLM's):

- tokenize: ``{"model", "prompt": str | [str], "add_special_tokens": true}`` →
  ``{"tokens": [int] | [[int]], "count": int | [int], "max_model_len": int}``;
- detokenize: ``{"model", "tokens": [int] | [[int]], "skip_special_tokens": true}`` →
  ``{"text": str | [str]}``.

The gateway checks a request before it routes it, so that bad input is a 400 naming the
field whoever answers it (the gateway's tokenizer or a worker's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shunter.protocols.errors import invalid_request, json_object

TOKENIZE_PATH = "/v1/tokenize"
DETOKENIZE_PATH = "/v1/detokenize"
TOKEN_PATHS = frozenset({TOKENIZE_PATH, DETOKENIZE_PATH})


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    prompts: list[str]
    batch: bool  # the prompt was a list: the answer is a list too
    add_special_tokens: bool


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    sequences: list[list[int]]
    batch: bool
    skip_special_tokens: bool = True


def parse_tokenize(body: bytes) -> TokenizeRequest:
    data = json_object(body)
    prompt = data.get("prompt")
    if prompt is None:
        raise invalid_request("'prompt' is required: a string or a list of strings")
    add_special = data.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise invalid_request("'add_special_tokens' must be true or false")
    if isinstance(prompt, str):
        return TokenizeRequest([prompt], False, add_special)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return TokenizeRequest(list(prompt), True, add_special)
    raise invalid_request("'prompt' must be a string or a non-empty list of strings")


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    data = json_object(body)
    tokens = data.get("tokens")
    if tokens is None:
        raise invalid_request("'tokens' is required: a list of token ids (or a list of such lists)")
    skip = data.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise invalid_request("'skip_special_tokens' must be true or false")
    if _ids(tokens):
        return DetokenizeRequest([list(tokens)], False, skip)
    if isinstance(tokens, list) and tokens and all(_ids(t) for t in tokens):
        return DetokenizeRequest([list(t) for t in tokens], True, skip)
    raise invalid_request(
        "'tokens' must be a list of non-negative integer token ids, or a list of such lists"
    )


def check(path: str, body: bytes) -> None:
    """A 400 ApiError naming the field if ``body`` is not a valid request for ``path``."""
    if path == TOKENIZE_PATH:
        parse_tokenize(body)
    else:
        parse_detokenize(body)


def tokenize_answer(
    request: TokenizeRequest, encode: Callable[[str, bool], Sequence[int]], max_model_len: int
) -> bytes:
    ids = [list(encode(p, request.add_special_tokens)) for p in request.prompts]
    if request.batch:
        return orjson.dumps(
            {"tokens": ids, "count": [len(i) for i in ids], "max_model_len": max_model_len}
        )
    return orjson.dumps({"tokens": ids[0], "count": len(ids[0]), "max_model_len": max_model_len})


def detokenize_answer(
    request: DetokenizeRequest, decode: Callable[[list[int], bool], str]
) -> bytes:
    texts = [decode(ids, request.skip_special_tokens) for ids in request.sequences]
    return orjson.dumps({"text": texts if request.batch else texts[0]})
