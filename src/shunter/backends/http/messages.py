"""A worker's 404 to ``/v1/messages``: no such endpoint, or no such model?

A server without Anthropic's Messages API (an older SGLang or vLLM, another
OpenAI-compatible server) answers 404 because the route is missing: relayed as it is, the
client would read "not found" and look for a wrong URL or model name. The gateway answers
501 instead, saying the worker does not serve the endpoint. A 404 that speaks of the model
(vLLM's "The model `claude-...` does not exist.") is the worker's verdict on the request
and is relayed unchanged.
"""

from __future__ import annotations

import logging

from shunter.backends.base import Outbound, Runtime, Target
from shunter.protocols.anthropic import MESSAGES_PATH
from shunter.protocols.errors import ApiError
from shunter.wire.base import StreamingResponse

log = logging.getLogger("shunter.backends.http")

_MAX_404_BODY = 64 * 1024  # an error body; more than this is not one worth reading


async def whole_body(upstream: StreamingResponse) -> bytes:
    """A streamed answer's body, read whole (to ``_MAX_404_BODY``), the stream closed."""
    body = b""
    try:
        while len(body) < _MAX_404_BODY and (chunk := await upstream.next_chunk()) is not None:
            body += chunk
    finally:
        await upstream.aclose()
    return body


def check_not_found(runtime: Runtime, target: Target, request: Outbound, body: bytes) -> None:
    """Raise the gateway's 501 if the worker's 404 says the endpoint is missing; return if
    it is about the model (the caller relays it)."""
    if b"model" in body.lower():
        return
    log.warning(
        "worker does not serve /v1/messages",
        extra={"worker": target.url, "runtime": runtime.value, "request_id": request.request_id},
    )
    raise ApiError(
        501,
        "messages_not_supported",
        f"the worker chosen for model `{request.model}` ({runtime.value}) answered 404 "
        f"Not Found to {MESSAGES_PATH}: it does not serve the Anthropic Messages API "
        "(SGLang and vLLM servers do)",
    )
