"""Writing a ``Reply`` to the client, and building the replies handlers return.

A whole body goes out with its Content-Length in one piece; a stream goes out chunk by chunk
as the stream yields them, and is closed in the end whatever happens (the client leaving
cancels the writing task: closing the stream is what releases the worker's connection and
the request's bookkeeping).
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.protocols.reply import JSON_CONTENT, TEXT_CONTENT, Headers, Reply
from shunter.wire.asgi import Send


async def write_reply(send: Send, reply: Reply, extra: Headers) -> None:
    body = reply.body
    if isinstance(body, bytes):
        headers = [*reply.headers, *extra, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    try:
        headers = [*reply.headers, *extra]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await body.aclose()


def json_reply(status: int, payload: Any, headers: Headers = ()) -> Reply:  # type: ignore[assignment]
    return Reply(status, [JSON_CONTENT, *headers], orjson.dumps(payload))


def text_reply(status: int, text: str) -> Reply:
    return Reply(status, [TEXT_CONTENT], text.encode())
