"""Whitespace words as token ids: the simulated worker's tokenizer, shared with the gateway.

A chat is rendered to the sim's prompt by ``chat_text`` (the sim's chat template): the
gateway renders a chat request the same way before taking its ids, so that it computes the
ids the sim cached.

``shunter sim`` counts a prompt in whitespace-separated words. To publish KV-cache events it
needs integer token ids, and a gateway routing precisely on those events must compute the
same ids from the request's text; both use this function. A word that is a decimal number
below 2**32 is that number (so a prompt given as token ids, as the gRPC sim receives it, keeps
its ids); any other word is the CRC-32 of its UTF-8 bytes (stable across processes, unlike
``hash``, and within SGLang's 4-byte token range).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any


def word_id(word: str) -> int:
    if word.isdecimal() and word.isascii():
        value = int(word)
        if value < 2**32:
            return value
    return zlib.crc32(word.encode())


def word_ids(words: Iterable[str]) -> list[int]:
    return [word_id(word) for word in words]


def text_ids(text: str) -> list[int]:
    """The ids of ``text`` as the sim tokenizes it (split on whitespace). Per request in
    precise mode: words go straight to CRC-32, a third faster than through ``word_id``."""
    crc32 = zlib.crc32
    return [word_id(w) if w.isdecimal() else crc32(w.encode()) for w in text.split()]


def chat_text(messages: Iterable[Mapping[str, Any]]) -> str:
    """The sim's prompt for a chat: ``<|role|> content`` per message, then the assistant's
    turn opened (``<|assistant|>``); a content given as parts keeps their texts."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role', 'user')}|> {content}")
    return " ".join(parts) + " <|assistant|>"
