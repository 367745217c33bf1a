"""Prompts encoded by segments (``tokenizer/segments.py``): the tokenizer's own ids, each
segment encoded once, and declined where the tokenizer does not treat pieces alone."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, normalizers, pre_tokenizers

from shunter.sim.tokenizer import sim_tokenizer, tokenizer_archive
from shunter.tokenizer.segments import SegmentEncoder
from shunter.tokenizer.tokenizer import ModelTokenizer

CHAT = [
    {"role": "system", "content": "You are a helpful assistant. " * 5},
    {"role": "user", "content": "café 日本語 <think>hm</think> 🙂 and  two  spaces\n\n"},
    {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
    {"role": "user", "content": ""},
]
TEXTS = [
    " lead<think>",
    "<|im_start|><|im_end|><|im_start|>",
    "a  b\n\n c<tool_call>{}</tool_call>  ",
    "",
]


def model_tokenizer() -> ModelTokenizer:
    with zipfile.ZipFile(io.BytesIO(tokenizer_archive())) as archive:
        return ModelTokenizer.from_files({n: archive.read(n) for n in archive.namelist()})


def test_prompts_by_segments_are_the_tokenizers_own_ids() -> None:
    tokenizer = model_tokenizer()
    assert tokenizer._segments is not None  # or this test proves nothing
    for text in [tokenizer.apply_chat_template(CHAT), *TEXTS]:
        expected = tokenizer.hf.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode_prompt(text) == expected
        assert tokenizer.encode_prompt(text) == expected  # again, from the cache


def counting(tokenizer: Tokenizer, calls: list[str]) -> Any:
    def encode(text: str) -> list[int]:
        calls.append(text)
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    return encode


def test_a_segment_seen_before_is_not_encoded_again() -> None:
    calls: list[str] = []
    hf = sim_tokenizer()
    encoder = SegmentEncoder.for_tokenizer(json.loads(hf.to_str()), counting(hf, calls))
    assert encoder is not None
    system = "<|im_start|>system\n" + "Be brief. " * 30 + "<|im_end|>\n"
    encoder.encode(system + "<|im_start|>user\nfirst<|im_end|>\n")
    calls.clear()
    encoder.encode(system + "<|im_start|>user\nsecond<|im_end|>\n")
    assert calls == ["user\nsecond"]  # the system prompt and the newlines came from the cache


def test_the_cache_keeps_at_most_its_characters() -> None:
    calls: list[str] = []
    hf = sim_tokenizer()
    encoder = SegmentEncoder.for_tokenizer(json.loads(hf.to_str()), counting(hf, calls))
    assert encoder is not None
    encoder._limit = 100
    for i in range(50):
        encoder.encode(f"<|im_start|>{'word ' * 5}{i}<|im_end|>")
    assert encoder._chars <= 100 and len(encoder._cache) < 50
    calls.clear()
    encoder.encode(f"<|im_start|>{'word ' * 5}0<|im_end|>")  # the oldest went first
    assert calls == [f"{'word ' * 5}0"]


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace(prepend_scheme="first")),
        lambda t: setattr(t, "normalizer", normalizers.NFC()),  # and <think> is normalized
    ],
    ids=["metaspace prepended to the first piece", "normalizer with a normalized token"],
)
def test_declined_where_pieces_are_not_treated_alone(change: Any) -> None:
    hf = Tokenizer.from_str(sim_tokenizer().to_str())
    change(hf)
    assert SegmentEncoder.for_tokenizer(json.loads(hf.to_str()), counting(hf, [])) is None


def test_declined_where_an_added_token_strips_around_it() -> None:
    config = json.loads(sim_tokenizer().to_str())
    config["added_tokens"][1]["lstrip"] = True
    assert SegmentEncoder.for_tokenizer(config, counting(sim_tokenizer(), [])) is None
