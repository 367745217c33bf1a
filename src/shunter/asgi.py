"""Small ASGI primitives shared by the gateway and the simulated worker.

Both servers are plain ASGI callables run by uvicorn (no framework: DESIGN §5 measured
frameworks as the largest per-request cost after the upstream client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_CONTENT = (b"content-type", b"application/json")
SSE_CONTENT = (b"content-type", b"text/event-stream")
TEXT_CONTENT = (b"content-type", b"text/plain; charset=utf-8")


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


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete response with a Content-Length."""
    all_headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_bytes(send, status, orjson.dumps(payload), [JSON_CONTENT, *headers])


async def start_stream(
    send: Send, status: int, headers: Iterable[tuple[bytes, bytes]] = (SSE_CONTENT,)
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})


async def send_chunk(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def end_stream(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class DisconnectWatch:
    """Cancels the current task when the client disconnects.

    uvicorn's ``send`` silently drops writes to a closed connection, so a relay that only
    writes would never learn that its client left. After the request body has been read,
    ``receive()`` returns only when the connection is lost or the response completes; this
    watch waits on it and cancels the owning task in the first case, so an upstream call
    is abandoned (and its connection closed) as soon as the client goes.
    """

    __slots__ = ("_finished", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._finished = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self._finished:
            self.disconnected = True
            self._task.cancel()

    def finish(self) -> None:
        """Mark the response complete: a later disconnect is then no reason to cancel."""
        self._finished = True
        self._watcher.cancel()

    def absorb_cancel(self) -> bool:
        """After catching CancelledError: True when the watch caused it (client left).

        In that case the cancellation is consumed so the task can finish cleanly.
        """
        if self.disconnected:
            self._task.uncancel()
            return True
        return False
