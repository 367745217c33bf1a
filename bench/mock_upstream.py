"""A fast mock worker for the proxy benchmark: a fixed chat answer, or a paced SSE stream.

POST with ``"stream": true`` in the body → 64 SSE chunks, 10 ms apart (``CHUNKS``/``GAP_MS``
env vars change that; a smaller ``"max_tokens"`` in the body caps the count, so a
time-to-first-byte probe need not wait for a whole stream); anything else → a fixed
~300-byte chat completion.
Run: python bench/mock_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from typing import Any

import uvicorn

ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox '
    b'jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,'
    b'"completion_tokens":10,"total_tokens":260}}'
)
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" token"},'
    b'"finish_reason":null}]}\n\n'
)
CHUNKS = int(os.environ.get("CHUNKS", "64"))
GAP = float(os.environ.get("GAP_MS", "10")) / 1000
MAX_TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')
SERVER_INFO = b'{"model_path":"bench","served_model_name":"bench"}'
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"sglang"}]}'
INFO = {"/health": b"", "/server_info": SERVER_INFO, "/v1/models": MODELS}


async def send_json(send: Any, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path = scope["path"]
    if path in INFO:
        await send_json(send, INFO[path])
        return
    if b'"stream": true' in body or b'"stream":true' in body:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        asked = MAX_TOKENS.search(body)
        chunks = min(CHUNKS, int(asked.group(1))) if asked else CHUNKS
        for i in range(chunks):
            if i:
                await asyncio.sleep(GAP)
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    await send_json(send, ANSWER)


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
        backlog=4096,
    )
