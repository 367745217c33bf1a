"""One HTTP exchange as handlers see it: the request's scope, its id, its body on demand.

Handlers never write to the connection: they return a ``Reply`` (``api/reply.py``), which
the app writes with the request id added.
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.protocols.errors import ApiError
from shunter.wire.asgi import Receive, Scope, content_length, read_body


class Call:
    __slots__ = (
        "body_limit",
        "method",
        "path",
        "receive",
        "request_id",
        "scope",
        "started",
        "worker",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        request_id: str,
        body_limit: int,
        started: float = 0.0,
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.request_id = request_id
        self.body_limit = body_limit
        self.started = started  # perf_counter() when the request arrived
        # The worker that answered, or the last one tried: the inference handler notes it,
        # whether the call succeeds or fails, for the access log.
        self.worker: str | None = None

    async def body(self) -> bytes:
        """The whole body; BodyTooLarge past ``body_limit``, ClientGone if the client left."""
        return await read_body(self.receive, self.body_limit, content_length(self.scope))

    async def json(self) -> Any:
        raw = await self.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "json_parse_error", f"malformed JSON body: {exc}") from None
