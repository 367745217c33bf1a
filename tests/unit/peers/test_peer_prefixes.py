"""Prefix text on the wire: whole blocks, sent once, then referenced by a digest."""

from __future__ import annotations

from shunter.peers.prefixes import PrefixDecoder, PrefixEncoder

SYSTEM = "".join(f"w{i} " for i in range(600))  # 2,890 characters: 11 whole blocks of 256
WHOLE = len(SYSTEM) // 256 * 256


def test_only_whole_blocks_go_and_they_decode_to_the_prompts_start() -> None:
    encoder, decoder = PrefixEncoder(), PrefixDecoder()
    base, blocks = encoder.encode("m", SYSTEM, now=0.0)
    assert base == 0 and [len(b) for b in blocks] == [256] * 11
    assert decoder.decode("m", base, blocks) == SYSTEM[:WHOLE]


def test_a_prefix_sent_lately_costs_a_reference_and_only_its_new_blocks() -> None:
    encoder, decoder = PrefixEncoder(), PrefixDecoder()
    first = SYSTEM + "user 1 asks " * 40
    second = SYSTEM + "user 2 wants " * 40
    decoder.decode("m", *encoder.encode("m", first, now=0.0))
    base, blocks = encoder.encode("m", second, now=1.0)
    assert base != 0
    assert sum(map(len, blocks)) < len(second) - 2048  # the system prompt is not resent
    whole = len(second) // 256 * 256
    assert decoder.decode("m", base, blocks) == second[:whole]
    again_base, again_blocks = encoder.encode("m", second, now=1.5)
    assert again_blocks == [] and decoder.decode("m", again_base, []) == second[:whole]


def test_a_peer_that_missed_the_blocks_cannot_resolve_until_they_are_resent() -> None:
    encoder = PrefixEncoder(resend_secs=2.0)
    encoder.encode("m", SYSTEM, now=0.0)  # went to peers while this one was away
    late = PrefixDecoder()
    assert late.decode("m", *encoder.encode("m", SYSTEM, now=1.0)) is None
    base, blocks = encoder.encode("m", SYSTEM, now=3.5)  # older than resend_secs: in full
    assert base == 0
    assert late.decode("m", base, blocks) == SYSTEM[:WHOLE]


def test_models_do_not_share_chains() -> None:
    encoder = PrefixEncoder()
    encoder.encode("a", SYSTEM, now=0.0)
    assert encoder.encode("b", SYSTEM, now=0.0)[0] == 0


def test_a_prompt_shorter_than_a_block_sends_no_text() -> None:
    encoder, decoder = PrefixEncoder(), PrefixDecoder()
    assert encoder.encode("m", "hello", now=0.0) == (0, [])
    assert decoder.decode("m", 0, []) == ""
