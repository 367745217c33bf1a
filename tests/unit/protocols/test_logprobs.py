"""Input logprobs across a pair: the prefill's in front of the decode's."""

from __future__ import annotations

import orjson

from shunter.protocols.logprobs import EventMerger, merged_body, prefill_logprobs

PREFILL = {0: [[-1.0, 1, None]], 1: [[-2.0, 2, None]]}


def test_the_prefills_logprobs_from_a_whole_answer_a_batch_and_a_stream() -> None:
    whole = orjson.dumps({"meta_info": {"input_token_logprobs": [[-1.0, 1, None]]}})
    assert prefill_logprobs(whole) == {0: [[-1.0, 1, None]]}
    batch = orjson.dumps([{"meta_info": {"input_token_logprobs": [[i, i, None]]}} for i in (1, 2)])
    assert prefill_logprobs(batch) == {0: [[1, 1, None]], 1: [[2, 2, None]]}
    stream = (
        b'data: {"index": 1, "meta_info": {"input_token_logprobs": [[-3, 3, null]]}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert prefill_logprobs(stream) == {1: [[-3, 3, None]]}
    assert prefill_logprobs(b"not json") == {}


def test_whole_answers_merge_per_sequence() -> None:
    decode = [{"meta_info": {"input_token_logprobs": [[-9.0, 9, None]]}}, {"meta_info": {}}]
    merged = orjson.loads(merged_body(orjson.dumps(decode), PREFILL))
    assert merged[0]["meta_info"]["input_token_logprobs"] == [[-1.0, 1, None], [-9.0, 9, None]]
    assert merged[1]["meta_info"]["input_token_logprobs"] == [[-2.0, 2, None]]
    assert merged_body(b'{"no": "meta"}', PREFILL) == b'{"no": "meta"}'  # untouched


def test_streamed_events_merge_whatever_the_chunking() -> None:
    events = (
        b'data: {"index": 1, "meta_info": {"input_token_logprobs": []}}\n\n'
        b'data: {"choices": []}\n\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 7, len(events)):
        merger = EventMerger(PREFILL)
        out = b"".join(merger.feed(events[i : i + size]) for i in range(0, len(events), size))
        out += merger.end()
        first, second, done, rest = out.split(b"\n\n")
        assert orjson.loads(first[6:])["meta_info"]["input_token_logprobs"] == PREFILL[1]
        assert second == b'data: {"choices": []}'  # no meta_info: byte for byte
        assert done == b"data: [DONE]" and rest == b""


def test_an_unterminated_tail_passes_as_it_was() -> None:
    merger = EventMerger(PREFILL)
    assert merger.feed(b'data: {"meta_info": {}}') == b""
    assert merger.end() == b'data: {"meta_info": {}}'
