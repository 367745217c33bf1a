"""Input (prompt) token logprobs, as a prefill worker returns them with ``return_logprob``.

In PD only the prefill has seen the prompt, so only its answer carries the prompt's
logprobs; the decode's list is empty and the gateway joins the two. The values are
deterministic (a hash of the token and its position), so a test can tell which positions
arrived and in what order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

VOCAB_SIZE = 32000  # token ids of whitespace words, for the text the HTTP sim tokenizes


def token_id(token: str) -> int:
    """The id of an HTTP-sim token: its own number when it is one (``input_ids``), else a hash."""
    return int(token) if token.isdigit() else zlib.crc32(token.encode()) % VOCAB_SIZE


def logprob(token: int, position: int) -> float:
    """A deterministic log-probability in [-10, -0.001]."""
    spread = zlib.crc32(f"{position}:{token}".encode()) % 10000
    return -round(0.001 + spread / 1000, 3)


def start_position(logprob_start_len: int, prompt_length: int) -> int:
    """Where input logprobs start. SGLang reads a negative start as "the last prompt token"."""
    if logprob_start_len < 0:
        return max(prompt_length - 1, 0)
    return min(logprob_start_len, prompt_length)


def input_token_logprobs(
    token_ids: Sequence[int], logprob_start_len: int
) -> list[tuple[float, int, None]]:
    """SGLang's ``meta_info.input_token_logprobs``: ``[logprob, token_id, null]`` per position
    from ``logprob_start_len`` (the third slot is the token's text, not asked for)."""
    start = start_position(logprob_start_len, len(token_ids))
    return [(logprob(t, i), t, None) for i, t in enumerate(token_ids) if i >= start]
