"""The inference endpoints: admission, then the router, whose reply goes back as it is.

Admission (``--max-concurrent-requests``, the queue, the rate limit) holds a slot until the
reply is done: for a whole body, as soon as the router hands it back; for a stream, when its
last chunk is out or its client leaves. A full queue is 429, a request that waited too long
408.

The request the router sees carries the client's headers minus the gateway's own key: no
worker ever receives that (the worker gets its own key, or the client's own Authorization:
which other headers it receives is ``backends/http/forwarding.py``'s allow-list).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from shunter.api.call import Call
from shunter.observability.metrics import Metrics
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import Reply, Stream
from shunter.routing.limiter import Admission, QueueFull, QueueTimeout
from shunter.routing.request import InferenceRequest
from shunter.wire.base import relay_of

BodyCheck = Callable[[str, bytes], Any]

INFERENCE_PATHS = (
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
)


class Routes(Protocol):
    """What routes an inference request: the ``Router``, or one for an endpoint's own rules
    (``routing/responses.py``)."""

    async def route(self, request: InferenceRequest) -> Reply: ...


class InferenceApi:
    def __init__(
        self,
        router: Routes,
        metrics: Metrics,
        admission: Admission | None = None,
        gateway_auth: bytes | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.admission = admission
        self.gateway_auth = gateway_auth  # "Bearer <--api-key>", never forwarded

    async def handle(self, call: Call, check: BodyCheck | None = None) -> Reply:
        """Admit, route, answer. ``check(path, body)``: a check of the body before routing
        (it raises the 400), for endpoints whose bad input must not reach a worker."""
        admission = self.admission
        if admission is None:
            return await self._route(call, check)
        try:
            await admission.acquire()
        except QueueFull:
            self.metrics.admission("rejected")
            raise ApiError(
                429, "rate_limit_exceeded", "too many requests: the gateway's request queue is full"
            ) from None
        except QueueTimeout:
            self.metrics.admission("timed_out")
            raise ApiError(
                408, "queue_timeout", "the request waited too long in the gateway's queue"
            ) from None
        self.metrics.admission("allowed")
        try:
            reply = await self._route(call, check)
        except BaseException:
            admission.release()
            raise
        if isinstance(reply.body, bytes):
            admission.release()
        else:
            reply.body = _Released(reply.body, admission.release)
        return reply

    async def _route(self, call: Call, check: BodyCheck | None) -> Reply:
        scope = call.scope
        headers = scope["headers"]
        if self.gateway_auth is not None:
            headers = [h for h in headers if h != (b"authorization", self.gateway_auth)]
        body = await call.body()
        if check is not None:
            check(call.path, body)
        request = InferenceRequest(
            call.method,
            call.path,
            scope["query_string"],
            headers,
            body,
            call.request_id,
            call.started,
        )
        try:
            return await self.router.route(request)
        finally:
            call.worker = request.worker


class _Released:
    """``chunks``, then ``done()`` once they are closed, however they end. A class, not a
    generator around them: it has nothing to do per chunk, so ``async for`` and ``relay``
    go to the inner stream's own (one layer fewer per chunk)."""

    def __init__(self, chunks: Stream, done: Callable[[], None]) -> None:
        self._chunks = chunks
        self._done: Callable[[], None] | None = done
        self.relay = relay_of(chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks.__aiter__()

    def __anext__(self) -> Awaitable[bytes]:
        return self._chunks.__anext__()

    async def aclose(self) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        try:
            await self._chunks.aclose()
        finally:  # the slot goes back even if the close is cut short (a second cancel)
            done()
