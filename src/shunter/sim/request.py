"""One HTTP request to the simulated worker, what its body says, and how it is refused."""

from __future__ import annotations

from typing import Any

import orjson

from shunter.protocols.reply import TEXT_CONTENT
from shunter.sim.send import send_bytes, send_json
from shunter.tokenizer.words import chat_text
from shunter.wire.asgi import Receive, Scope, Send


class DroppedConnection(Exception):
    """Raised on purpose after the response started, so uvicorn cuts the connection."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """``record`` is this request's entry in ``/sim/requests`` (None for the other routes):
    handlers add to it what tests check afterwards (rooms, whether the client left)."""

    __slots__ = ("body", "receive", "record", "scope", "send", "worker_header")

    def __init__(self, scope: Scope, receive: Receive, send: Send, body: bytes, worker: bytes):
        self.scope = scope
        self.receive = receive
        self.send = send
        self.body = body
        self.worker_header = (b"x-worker-id", worker)
        self.record: dict[str, Any] = {}

    def json(self) -> dict[str, Any]:
        try:
            payload = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest("the body must be a JSON object")
        return payload

    async def reply(self, status: int, payload: Any) -> None:
        await send_json(self.send, status, payload, [self.worker_header])

    async def reply_text(self, status: int, text: str) -> None:
        await send_bytes(self.send, status, text.encode(), [TEXT_CONTENT, self.worker_header])


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def chat_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if not all(isinstance(message, dict) for message in messages):
        raise BadRequest("each message must be an object")
    return chat_text(messages)


def max_tokens_of(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest("max_tokens must be a non-negative integer")
    return value
