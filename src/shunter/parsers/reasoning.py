"""Reasoning parsers: split a model's thinking (``reasoning_content``) from its answer.

- ``deepseek_r1``: the chat template opens the thinking, so the output is reasoning until
  ``</think>`` (a leading ``<think>`` is dropped too);
- ``qwen3``: reasoning only when the output begins with ``<think>``, up to ``</think>``.

One parser per request; ``feed`` takes each new piece of text and returns the reasoning and
content it completes, holding back what may be half a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from shunter.tokenizer.stop import partial_tag

START, END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningStyle:
    starts_in_reasoning: bool


REASONING_PARSERS = {
    "deepseek_r1": ReasoningStyle(starts_in_reasoning=True),
    "qwen3": ReasoningStyle(starts_in_reasoning=False),
}


class ReasoningParser:
    __slots__ = ("_at_start", "_buffer", "_content_started", "_in_reasoning")

    def __init__(self, style: ReasoningStyle) -> None:
        self._in_reasoning = style.starts_in_reasoning
        self._at_start = True  # nothing emitted yet: a leading <think> may still come
        self._buffer = ""
        self._content_started = True  # False right after </think>: strip the gap after it

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) completed by ``text``."""
        self._buffer += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._buffer:
            if self._at_start:
                stripped = self._buffer.lstrip()
                if stripped.startswith(START):
                    self._buffer, self._in_reasoning = stripped[len(START) :], True
                elif START.startswith(stripped):
                    break  # could still become <think>: wait
                self._at_start = False
                continue
            if not self._in_reasoning:
                text = self._buffer if self._content_started else self._buffer.lstrip()
                self._content_started = self._content_started or bool(text)
                content.append(text)
                self._buffer = ""
                break
            at = self._buffer.find(END)
            if at >= 0:
                reasoning.append(self._buffer[:at])
                self._buffer, self._in_reasoning = self._buffer[at + len(END) :], False
                self._content_started = False
                continue
            hold = partial_tag(self._buffer, END)
            reasoning.append(self._buffer[: len(self._buffer) - hold])
            self._buffer = self._buffer[len(self._buffer) - hold :]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is held at the end of the output."""
        held, self._buffer = self._buffer, ""
        return (held, "") if self._in_reasoning else ("", held)
