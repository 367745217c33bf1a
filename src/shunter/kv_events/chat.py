"""A chat request's token ids as the engine computes them, for precise scoring.

Engines cache the *templated* prompt: the chat rendered by the model's chat template, the
assistant's turn opened, then tokenized without adding special tokens again (the template
writes its own BOS). Scoring the messages' contents joined would never match a block the
engine stored, so a chat is rendered here the way its engine renders it:

- ``words`` (``shunter sim``): the sim's own template (``tokenizer/words.py chat_text``),
  then its whitespace ids;
- a tokenizer directory: the chat template of its ``tokenizer_config.json`` (or its
  ``chat_template.jinja``), rendered as the gateway renders it for gRPC workers
  (``tokenizer/tokenizer.py``) with the request's ``tools`` and ``chat_template_kwargs``,
  then encoded without special tokens. Content parts keep their text parts, joined, as the
  gRPC path sends them.

Only precise mode pays for this, per chat request: on a 750-byte chat of 160 words, the
``words`` rendering took 50 µs (decode, render, ids) where the joined contents' ids took 30.

A body that cannot be rendered (no template, a message without a role, a template error)
gives None: the caller scores the joined contents instead, as before, which costs only a
miss. A bare ``tokenizer.json`` has no template: chat is then scored that way throughout,
which is logged once at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from shunter.tokenizer.words import chat_text, text_ids

log = logging.getLogger("shunter.kv_events")

# A chat request's body -> the ids its engine computes, or None when it cannot be rendered.
ChatIds = Callable[[bytes], Sequence[Any] | None]


def chat_ids_from(source: str) -> ChatIds | None:
    """How to turn a chat body into ids for ``--kv-events-tokenizer source``; None when the
    tokenizer has no chat template."""
    if source == "words":
        return _words_chat_ids
    from shunter.tokenizer.tokenizer import ModelTokenizer, TokenizerError

    path = Path(source)
    if not path.is_dir():
        log.warning(
            "kv events: a tokenizer.json file has no chat template; chat requests are "
            "scored by their contents alone and will rarely match (give the directory)",
            extra={"tokenizer": source},
        )
        return None
    try:
        tokenizer = ModelTokenizer.from_directory(source)
    except TokenizerError as exc:  # the same files already loaded for text: unlikely
        log.warning("kv events: no chat template", extra={"error": str(exc)})
        return None
    if not tokenizer.chat_template:
        log.warning(
            "kv events: the tokenizer has no chat template; chat requests are scored by "
            "their contents alone and will rarely match",
            extra={"tokenizer": source},
        )
        return None

    def encode(body: bytes) -> list[int] | None:
        chat = _chat_of(body)
        if chat is None:
            return None
        messages, tools, kwargs = chat
        try:
            text = tokenizer.apply_chat_template([_text_parts(m) for m in messages], tools, kwargs)
        except TokenizerError:
            return None  # the worker will refuse it or render it its own way: no score
        return tokenizer.encode(text, add_special_tokens=False)

    return encode


def _words_chat_ids(body: bytes) -> list[int] | None:
    chat = _chat_of(body)
    return None if chat is None else text_ids(chat_text(chat[0]))


def _chat_of(body: bytes) -> tuple[list[dict[str, Any]], list[Any] | None, dict[str, Any]] | None:
    """The messages, tools and template arguments of a chat body; None if malformed."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return None
    tools = data.get("tools")
    if not isinstance(tools, list) or data.get("tool_choice") == "none":
        tools = None
    kwargs = data.get("chat_template_kwargs")
    return messages, tools, kwargs if isinstance(kwargs, dict) else {}


def _text_parts(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return {**message, "content": "".join(texts)}
