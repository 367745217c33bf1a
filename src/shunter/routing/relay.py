"""A worker's streamed answer on its way to the client, watched: stream metrics (time to
first token, token counts), an in-band error event if the worker breaks off, and the
attempt's bookkeeping (the worker's load, the request's metric, its spans) once it ends,
however it ends: the last chunk, a broken worker, or the client leaving (499).

Two ways through, with the same bookkeeping:

- ``relay(sink)``, when the worker's stream can relay (an HTTP worker, ``wire/client.py``)
  and the server offers a sink (``wire/server.py``): each chunk goes from the worker
  connection's callback through ``on_chunk`` to the client's transport, and the task waits
  only for the end. A relayed chunk cost 20.4k instructions this way against 32.7k when
  a task iterated the chain of async generators (callgrind, ``bench/README.md``).
- ``async for`` (``__anext__``), for everything else: a gRPC worker's stream, a PD pair's,
  a layer that reads the chunks itself (the Responses API's id finder), another server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.observability.streams import StreamStats
from shunter.protocols.anthropic import MESSAGES_PATH, anthropic_stream_error
from shunter.protocols.errors import stream_broken_event, upstream_failure
from shunter.protocols.reply import Stream
from shunter.routing.receipt import Routed
from shunter.routing.request import InferenceRequest
from shunter.routing.verdict import Verdict
from shunter.wire.base import BodySink, Relay, Throttled, UpstreamError, relay_of

log = logging.getLogger("shunter.router")

Done = Callable[[InferenceRequest, int, str], None]  # (request, status, error code): recorded


class WatchedStream:
    """``chunks`` (the worker's stream, answered ``status``) as the client receives it."""

    __slots__ = (
        "_chunks",
        "_closed",
        "_code",
        "_done",
        "_metrics",
        "_model",
        "_over",
        "_request",
        "_routed",
        "_span",
        "_stats",
        "_status",
        "_worker",
    )

    def __init__(
        self,
        chunks: Stream,
        status: int,
        worker: Worker,
        model: str,
        request: InferenceRequest,
        metrics: Metrics,
        done: Done,
        span: Any = None,
        routed: Routed | None = None,
    ) -> None:
        self._chunks = chunks
        self._status = status
        self._worker = worker
        self._model = model
        self._request = request
        self._metrics = metrics
        self._done = done
        self._span = span
        self._routed = routed
        self._stats = StreamStats(request.started)
        self._over = False  # the worker's stream ended or broke (else the client left)
        self._code = ""
        self._closed = False

    @property
    def relay(self) -> Relay | None:
        """None: the worker's stream cannot relay, so neither can this (``relay_of``). A
        property, not an attribute set to the bound method: an object holding its own bound
        method is a reference loop, and every stream's objects then waited for the cyclic
        garbage collector (~20 objects a stream)."""
        return self._relay if relay_of(self._chunks) is not None else None

    def __aiter__(self) -> WatchedStream:
        return self

    async def __anext__(self) -> bytes:
        if self._over:
            raise StopAsyncIteration
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._ended()
            raise
        except UpstreamError as exc:
            return self._broke(exc)
        self._stats.on_chunk(chunk)
        return chunk

    async def _relay(self, sink: BodySink) -> None:
        relay = relay_of(self._chunks)
        assert relay is not None
        try:
            await relay(_Observed(sink, self._stats.on_chunk))
        except UpstreamError as exc:
            sink.write(self._broke(exc))
            return
        self._ended()

    def _ended(self) -> None:
        self._over = True
        if self._status == 200:
            request, routed = self._request, self._routed
            self._metrics.observe_stream(self._model, request.path, self._stats)
            if routed is not None and routed.measured:
                routed.settle(self._stats.counted, self._model, self._metrics, request.span)

    def _broke(self, exc: UpstreamError) -> bytes:
        """The worker broke off after the status was sent: the event telling the client."""
        self._over = True
        worker, request = self._worker, self._request
        log.warning(
            "stream broke",
            extra={"worker": worker.url, "error": str(exc), "request_id": request.request_id},
        )
        worker.state.failed()
        self._metrics.worker_error(worker, "stream_" + exc.kind)
        Verdict.stream_broke(worker)
        self._code = "upstream_stream_broken"
        if request.path == MESSAGES_PATH:
            return anthropic_stream_error(f"the worker stream broke: {upstream_failure(exc.kind)}")
        return stream_broken_event(exc.kind)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        outcome, code = (self._status, self._code) if self._over else (499, "client_closed")
        try:
            await self._chunks.aclose()
        finally:  # counted as ended even if the close is cut short (a second cancel)
            self._worker.state.finished()
            self._done(self._request, outcome, code)
            _end(self._span)
            _end(self._request.span)


class _Observed:
    """A sink that shows each chunk to ``on_chunk`` before writing it."""

    __slots__ = ("_on_chunk", "_sink")

    def __init__(self, sink: BodySink, on_chunk: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._on_chunk = on_chunk

    def write(self, chunk: bytes) -> None:
        self._on_chunk(chunk)
        self._sink.write(chunk)

    def throttle(self, reading: Throttled) -> None:
        self._sink.throttle(reading)


def _end(span: Any) -> None:
    """End a held tracing span (None: tracing is off)."""
    if span is not None:
        span.end()
