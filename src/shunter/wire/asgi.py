"""Small ASGI primitives shared by the gateway and the simulated worker: the types, reading a
request body within a limit, reading a header.

Both are plain ASGI callables (no framework: in this project's measurements, frameworks
were the largest per-request cost after the upstream client). The gateway runs on our own
server (``wire/server.py``), the simulated worker on uvicorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is larger than the configured limit."""


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


async def read_body(receive: Receive, limit: int, declared_length: int | None) -> bytes:
    """Read the request body, refusing it once it exceeds ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is read, and a
    chunked body is refused as soon as the running total passes the limit, so a huge body
    is never held in memory.
    """
    if declared_length is not None and declared_length > limit:
        raise BodyTooLarge
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise BodyTooLarge
    if not message.get("more_body", False):
        return body
    parts = [body]
    total = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def header_value(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a (lower-case) request header, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def content_length(scope: Scope) -> int | None:
    raw = header_value(scope, b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
