"""The prefix-cache figures a worker reports in its answer, read off the bytes.

OpenAI's shape puts them in ``usage`` (``prompt_tokens``, and
``prompt_tokens_details.cached_tokens``), SGLang's native one in ``meta_info``
(``prompt_tokens``, ``cached_tokens``): in both the field names are unique in the answer,
and come at its end (a stream: in its last chunk that carries counts). So instead of
parsing the JSON, ``reported_cache`` looks for the field's last occurrence from the end of
the bytes and reads the number after it: a whole answer of megabytes costs a few hundred
nanoseconds, not a parse. A field name inside generated text cannot match: JSON escapes the
quotes around it.
"""

from __future__ import annotations

import re

_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')


def reported_cache(data: bytes) -> tuple[int, int | None] | None:
    """(cached tokens, prompt tokens or None) as the worker reported them in ``data`` (a
    whole JSON answer, or a stream's chunk of SSE events: the last figures win); None when
    it reports no cached tokens (the field is absent, or not followed by a number)."""
    cached = _last(_CACHED, b'"cached_tokens"', data)
    if cached is None:
        return None
    return cached, _last(_PROMPT, b'"prompt_tokens"', data)


def _last(pattern: re.Pattern[bytes], name: bytes, data: bytes) -> int | None:
    at = data.rfind(name)
    if at < 0:
        return None
    found = pattern.match(data, at)
    return int(found.group(1)) if found is not None else None
