"""A chat request is scored by the ids its engine computes: the sim's template for ``words``,
a tokenizer directory's chat template otherwise; what cannot be rendered falls back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from shunter.kv_events.chat import chat_ids_from
from shunter.kv_events.hub import KvEvents
from shunter.kv_events.wire import BlockStored
from shunter.sim.request import chat_prompt
from shunter.sim.tokenizer import sim_tokenizer, tokenizer_config
from shunter.tokenizer.words import text_ids

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url"}]},
]


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "messages": MESSAGES, **fields})


def test_words_renders_a_chat_as_the_sim_does() -> None:
    chat_ids = chat_ids_from("words")
    assert chat_ids is not None
    assert chat_ids(_body()) == text_ids(chat_prompt(MESSAGES))


def test_a_tokenizer_directory_renders_its_chat_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(sim_tokenizer().to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    chat_ids = chat_ids_from(str(tmp_path))
    assert chat_ids is not None
    rendered = (
        "<|im_start|>system\nyou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_ids(_body()) == sim_tokenizer().encode(rendered, add_special_tokens=False).ids


def test_no_template_or_a_malformed_chat_falls_back(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(sim_tokenizer().to_str())
    assert chat_ids_from(str(tmp_path)) is None  # no tokenizer_config.json: no template
    assert chat_ids_from(str(tmp_path / "tokenizer.json")) is None
    chat_ids = chat_ids_from("words")
    assert chat_ids is not None
    for body in (b"not json", b"[]", b'{"messages": []}', b'{"messages": [{"content": "x"}]}'):
        assert chat_ids(body) is None


def test_the_hub_scores_a_chat_by_its_rendered_prompt() -> None:
    chat_ids = chat_ids_from("words")
    assert chat_ids is not None
    hub = KvEvents(text_ids, chat=chat_ids)
    ids = text_ids(chat_prompt(MESSAGES))
    block = tuple(ids[:4])
    hub.index.of("m").apply("w", BlockStored((1,), None, block, 4, "GPU"))
    joined = "you are a helpful assistant\nhello"
    assert hub.cached_tokens("m", joined) == (len(text_ids(joined)), {})
    assert hub.cached_tokens("m", joined, _body()) == (len(ids), {"w": 4})
    assert hub.cached_tokens("m", joined, b"{}") == (len(text_ids(joined)), {})
