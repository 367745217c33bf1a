"""Incremental detokenization: text for each new token id, never half a character.

Decoding token by token splits multi-byte characters (byte-level BPE spreads one across
several ids) and loses spaces some tokenizers attach to the following token. So each step
decodes a short window twice: the ids already emitted (from ``prefix_offset``) and the same
window plus the new ids; the new text is the difference. If the difference ends in U+FFFD,
a character is still incomplete and nothing is emitted until it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from shunter.tokenizer.tokenizer import ModelTokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    __slots__ = ("_prefix", "_read", "ids", "skip_special_tokens", "tokenizer")

    def __init__(self, tokenizer: ModelTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this have been emitted as text

    def add(self, new_ids: Sequence[int]) -> str:
        """The text the new ids complete (possibly empty)."""
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], self.skip_special_tokens)
        after = decode(self.ids[self._prefix :], self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back, at the end of the output."""
        if self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], self.skip_special_tokens)
        after = decode(self.ids[self._prefix :], self.skip_special_tokens)
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]
