"""The gRPC path's text pipeline, in process: tokenizer and chat template, incremental
detokenization, stop strings, reasoning and tool-call parsers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tokenizers")

from shunter.parsers.reasoning import REASONING_PARSERS, ReasoningParser
from shunter.parsers.tool_calls import ToolCallParser
from shunter.sim.tokenizer import sim_tokenizer, tokenizer_archive
from shunter.tokenizer.detokenize import IncrementalDetokenizer
from shunter.tokenizer.stop import StopStrings
from shunter.tokenizer.tokenizer import ModelTokenizer, TokenizerError

MIXED = "the café says 日本語 and 🙂🚀 over the bridge"


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(tokenizer_archive())) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    return ModelTokenizer.from_files(files)


def test_chat_template_renders_the_conversation(tokenizer: ModelTokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.eos_ids == (sim_tokenizer().token_to_id("<|im_end|>"),)


def test_a_broken_template_is_a_tokenizer_error(tokenizer: ModelTokenizer) -> None:
    broken = ModelTokenizer(tokenizer.hf, "{{ raise_exception('no system role') }}", {}, ())
    with pytest.raises(TokenizerError, match="no system role"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    sandboxed = ModelTokenizer(tokenizer.hf, "{{ ''.__class__.__mro__ }}", {}, ())
    with pytest.raises(TokenizerError):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])


def test_detokenizing_one_id_at_a_time_never_splits_a_character(
    tokenizer: ModelTokenizer,
) -> None:
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    # Some character really spans several ids, or this test proves nothing.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MIXED == tokenizer.decode(ids)


def test_special_tokens_are_skipped_unless_asked(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("hello<|im_end|>", add_special_tokens=False)
    assert "".join(IncrementalDetokenizer(tokenizer).add([i]) for i in ids) == "hello"
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(kept.add([i]) for i in ids) + kept.flush() == "hello<|im_end|>"


@pytest.mark.parametrize(("keep", "expected"), [(False, "one two "), (True, "one two STOP")])
def test_stop_string_split_across_pieces(keep: bool, expected: str) -> None:
    stops = StopStrings(["STOP"], no_stop_trim=keep)
    out = "".join(stops.feed(piece) for piece in ["one t", "wo S", "T", "OP three"])
    assert out + stops.flush() == expected
    assert stops.stopped


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    stops = StopStrings(["STOP"])
    assert stops.feed("a ST") == "a "
    assert stops.feed("ART") == "START"
    assert stops.feed(" end S") == " end "
    assert stops.flush() == "S" and not stops.stopped


def stream(parser: ReasoningParser, text: str) -> tuple[str, str]:
    parts = [parser.feed(ch) for ch in text] + [parser.flush()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


@pytest.mark.parametrize("streamed", [False, True])
def test_reasoning_parsers(streamed: bool) -> None:
    def run(name: str, text: str) -> tuple[str, str]:
        parser = ReasoningParser(REASONING_PARSERS[name])
        if streamed:
            return stream(parser, text)
        reasoning, content = parser.feed(text)
        tail = parser.flush()
        return reasoning + tail[0], content + tail[1]

    assert run("deepseek_r1", "weigh it</think>\n\nYes.") == ("weigh it", "Yes.")
    assert run("deepseek_r1", "<think>weigh it</think>Yes.") == ("weigh it", "Yes.")
    assert run("deepseek_r1", "still thinking") == ("still thinking", "")
    assert run("qwen3", "<think>hmm</think>\nNo.") == ("hmm", "No.")
    assert run("qwen3", "No thinking here.") == ("", "No thinking here.")


CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_call_parsers(streamed: bool) -> None:
    def run(style: str, text: str) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        parser = ToolCallParser(style)
        pieces = [parser.feed(ch) for ch in text] if streamed else [parser.feed(text)]
        pieces.append(parser.flush())
        calls = [c for _, found in pieces for c in found]
        return "".join(t for t, _ in pieces), [(c.name, json.loads(c.arguments)) for c in calls]

    tagged = f"Let me check.<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
    assert run("tags", tagged) == ("Let me check.", [("get_weather", {"city": "Paris"})])
    two = f"<tool_call>{json.dumps(CALL)}</tool_call><tool_call>{json.dumps(CALL)}</tool_call>"
    assert len(run("tags", two)[1]) == 2
    assert run("tags", "<tool_call>not json</tool_call>")[1] == []
    assert run("json", json.dumps(CALL)) == ("", [("get_weather", {"city": "Paris"})])
    assert run("json", json.dumps([CALL, CALL]))[1] == [("get_weather", {"city": "Paris"})] * 2
    assert run("json", "Plain answer.") == ("Plain answer.", [])
    assert run("json", '{"not": "a call"}') == ('{"not": "a call"}', [])
