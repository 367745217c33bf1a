"""Sending ASGI responses, as the simulated worker does: whole (with a Content-Length), as
JSON, or streamed chunk by chunk. The gateway does not use these: its handlers return a
``Reply`` that ``api/reply.py`` writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from shunter.protocols.reply import JSON_CONTENT, SSE_CONTENT
from shunter.wire.asgi import Send


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
