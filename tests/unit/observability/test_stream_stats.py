"""A stream's token counts, read once at its end from its last chunks."""

from __future__ import annotations

from shunter.observability.streams import TAIL_CHUNKS, StreamStats
from shunter.protocols.usage import reported_cache

CONTENT = b'data: {"choices": [{"delta": {"content": "usage"}}]}\n\n'


def test_counts_split_over_two_reads_and_followed_by_done_are_found() -> None:
    stats = StreamStats(0.0)
    event = (
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, '
        b'"prompt_tokens_details": {"cached_tokens": 5}}}\n\n'
    )
    for _ in range(10):
        stats.on_chunk(CONTENT)
    stats.on_chunk(event[:40])
    stats.on_chunk(event[40:])
    stats.on_chunk(b"data: [DONE]\n\n")
    assert stats.tokens() == (7, 3)
    assert stats.counted is not None and reported_cache(stats.counted) == (5, 7)


def test_anthropic_counts_come_in_message_delta_before_message_stop() -> None:
    stats = StreamStats(0.0)
    stats.on_chunk(b'event: content_block_stop\ndata: {"type": "content_block_stop"}\n\n')
    stats.on_chunk(
        b'event: message_delta\ndata: {"type": "message_delta", '
        b'"usage": {"input_tokens": 11, "output_tokens": 4}}\n\n'
    )
    stats.on_chunk(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    assert stats.tokens() == (11, 4)


def test_a_stream_without_counts_has_none_and_only_its_tail_is_kept() -> None:
    stats = StreamStats(0.0)
    assert stats.counted is None and stats.tokens() is None
    for i in range(3 * TAIL_CHUNKS):
        stats.on_chunk(b"data: %d\n\n" % i)
    assert stats.first is not None
    kept = range(2 * TAIL_CHUNKS, 3 * TAIL_CHUNKS)
    assert stats.counted == b"".join(b"data: %d\n\n" % i for i in kept)
    stats.on_chunk(CONTENT)
    assert stats.tokens() is None  # "usage" in a token's text is no count
