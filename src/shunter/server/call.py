"""One HTTP exchange as handlers see it: scope, body reading, replies carrying the request id."""

from __future__ import annotations

from typing import Any

import orjson

from shunter.asgi import (
    JSON_CONTENT,
    TEXT_CONTENT,
    Receive,
    Scope,
    Send,
    content_length,
    read_body,
    send_bytes,
)
from shunter.protocols.errors import ApiError


class Call:
    __slots__ = ("body_limit", "method", "path", "receive", "request_id", "scope", "send",
                 "started", "worker")  # fmt: skip

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        body_limit: int,
        started: float = 0.0,
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.request_id = request_id
        self.body_limit = body_limit
        self.started = started  # perf_counter() when the request arrived
        self.worker: str | None = None  # the worker that served it, for the access log

    @property
    def id_header(self) -> tuple[bytes, bytes]:
        return (b"x-request-id", self.request_id.encode())

    async def body(self) -> bytes:
        return await read_body(self.receive, self.body_limit, content_length(self.scope))

    async def json(self) -> Any:
        raw = await self.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "json_parse_error", f"malformed JSON body: {exc}") from None

    async def reply_json(self, status: int, payload: Any) -> int:
        await send_bytes(self.send, status, orjson.dumps(payload), [JSON_CONTENT, self.id_header])
        return status

    async def reply_text(self, status: int, text: str) -> int:
        await send_bytes(self.send, status, text.encode(), [TEXT_CONTENT, self.id_header])
        return status

    async def reply_error(self, status: int, code: str, message: str) -> int:
        await ApiError(status, code, message).send(self.send, [self.id_header])
        return status

    async def reply_raw(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        await send_bytes(self.send, status, body, [*headers, self.id_header])
        return status
