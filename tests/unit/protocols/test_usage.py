"""Reading a worker's reported cached tokens off the bytes of its answer."""

from __future__ import annotations

import json

import orjson
import pytest

from shunter.protocols.usage import reported_cache

OPENAI = orjson.dumps(
    {
        "id": "cmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {
            "prompt_tokens": 300,
            "completion_tokens": 2,
            "total_tokens": 302,
            "prompt_tokens_details": {"cached_tokens": 256},
        },
    }
)
SGLANG = orjson.dumps(
    {"text": "hi", "meta_info": {"prompt_tokens": 41, "completion_tokens": 2, "cached_tokens": 32}}
)


def test_a_whole_openai_answer() -> None:
    assert reported_cache(OPENAI) == (256, 300)


def test_a_whole_sglang_answer() -> None:
    assert reported_cache(SGLANG) == (32, 41)


def test_json_with_spaces_as_pythons_encoder_writes_it() -> None:
    spaced = json.dumps(
        {"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}}
    )
    assert reported_cache(spaced.encode()) == (8, 9)


def test_a_streamed_chunk_the_last_event_wins() -> None:
    events = b"".join(
        b"data: "
        + orjson.dumps({"text": "x" * i, "meta_info": {"prompt_tokens": 41, "cached_tokens": c}})
        + b"\n\n"
        for i, c in ((1, 0), (2, 16), (3, 32))
    )
    assert reported_cache(events) == (32, 41)
    usage_chunk = b"data: " + OPENAI + b"\n\ndata: [DONE]\n\n"
    assert reported_cache(usage_chunk) == (256, 300)


def test_no_prompt_tokens_still_gives_the_cached_ones() -> None:
    assert reported_cache(b'{"meta_info": {"cached_tokens": 7}}') == (7, None)


@pytest.mark.parametrize(
    "data",
    [
        b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}',  # no cache figure
        b"",
        b'{"usage": {"prompt_tokens_details": {"cached_tokens": null}}}',
        b'{"usage": {"prompt_tokens_details": {"cached_tokens": "12"}}}',
        b'{"usage": {"prompt_tokens_details": {"cached_tokens"',  # cut short
        b"\xff\xfe not json at all",
        # the field's name inside generated text is escaped, so it does not count
        orjson.dumps({"choices": [{"text": '"cached_tokens": 99'}]}),
    ],
)
def test_an_absent_or_malformed_figure_is_none(data: bytes) -> None:
    assert reported_cache(data) is None
