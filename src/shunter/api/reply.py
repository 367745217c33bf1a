"""Writing a ``Reply`` to the client, and building the replies handlers return.

A whole body goes out with its Content-Length in one piece; a stream goes out chunk by chunk
as the stream yields them, and is closed in the end whatever happens (the client leaving
cancels the writing task: closing the stream is what releases the worker's connection and
the request's bookkeeping). A stream that can relay (an HTTP worker's, ``wire/client.py``)
writes its chunks to the server's sink from the worker connection's callback instead, and
the writing task waits only for its end: no task wake-up, no generator and no ``send`` per
chunk (bench/README.md has the map and the numbers).
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.protocols.reply import JSON_CONTENT, TEXT_CONTENT, Headers, Reply
from shunter.wire.asgi import Scope, Send
from shunter.wire.base import BODY_SINK, BodySink, relay_of


async def write_reply(
    send: Send, reply: Reply, extra: Headers, sink: BodySink | None = None
) -> None:
    """Write ``reply``; a stream's chunks through ``sink`` when both can (``relay``)."""
    body = reply.body
    if isinstance(body, bytes):
        headers = [*reply.headers, *extra, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    try:
        # The head's list in no local variable: this frame lasts as long as the stream.
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [*reply.headers, *extra],
            }
        )
        relay = relay_of(body)
        if relay is not None and sink is not None:
            await relay(sink)  # the chunks go from the worker's callback to the client's
        else:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await body.aclose()


def body_sink(scope: Scope) -> BodySink | None:
    """Where the server lets a stream write its chunks directly, if it does (ours does:
    ``wire/server.py``)."""
    extensions = scope.get("extensions")
    return extensions.get(BODY_SINK) if extensions else None


def json_reply(status: int, payload: Any, headers: Headers = ()) -> Reply:  # type: ignore[assignment]
    return Reply(status, [JSON_CONTENT, *headers], orjson.dumps(payload))


def text_reply(status: int, text: str) -> Reply:
    return Reply(status, [TEXT_CONTENT], text.encode())
