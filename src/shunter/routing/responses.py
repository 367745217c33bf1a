"""The Responses API (``/v1/responses``) through the gateway: creation, continuation, storage.

vLLM and SGLang serve the Responses API over HTTP and keep the responses they create in their
own memory. So the gateway remembers which worker created each response
(``affinity.py``), and:

- ``POST /v1/responses`` is routed as chat is (policy, retries, streaming relay, metrics),
  among the model's HTTP workers. Its answer tells the response's id: a whole body's
  ``id``, or a stream's first event (``response.created``). Only the stream's first events
  are looked at, until the id is found; the rest is relayed untouched. With ``store:
  false`` the worker keeps nothing, and neither does the gateway.
- A request with ``previous_response_id`` goes first to the worker that created that
  response: it holds the conversation, and the conversation's prefix in its KV cache (the
  route receipt's reason is ``previous_response``). When that worker has been removed, is
  unavailable (unhealthy, its breaker open) or fails the request, the policy chooses
  among the others, as for any request; a worker that does not hold the previous response
  then answers its own 404, as it would without the gateway. An id the gateway never
  learnt is routed by the policy too (smg passes the request through unchanged): the id may
  have been forgotten (the affinity's bounds) while its worker still has it.
- ``GET``/``DELETE /v1/responses/{id}``, ``GET .../input_items`` and ``POST .../cancel``
  go to the worker that created the response, and to it alone (``Router.forward``): an id
  the gateway never learnt is a 404 naming it (``response_not_found``), and so is one
  whose worker has been removed (``response_worker_removed``): 404 and not 410, since an
  OpenAI client knows a missing response as 404, and the code says why.

Each response learnt is handed to ``announce`` (the peer exchange, when on), so every
process of ``--workers N``, and every peer gateway, can find it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from shunter.fleet.worker import Worker
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import Chunks, Reply, Stream, primed
from shunter.protocols.routing import RequestFields
from shunter.routing.affinity import ResponseAffinity
from shunter.routing.request import InferenceRequest
from shunter.routing.router import Router

log = logging.getLogger("shunter.router")

RESPONSES_PATH = "/v1/responses"


class _Creation(msgspec.Struct):
    """What the gateway reads of a ``POST /v1/responses`` beyond the routing fields (a
    second pass over the body, on this endpoint only)."""

    previous_response_id: Any = None
    store: Any = None


class _Created(msgspec.Struct):
    id: Any = None


class _Event(msgspec.Struct):
    response: _Created | None = None


_creation = msgspec.json.Decoder(_Creation)
_created = msgspec.json.Decoder(_Created)
_event = msgspec.json.Decoder(_Event)


@dataclass(slots=True)
class StoredResponseRequest(InferenceRequest):
    """A request about a stored response (``GET``, ``DELETE``, ``cancel``): its body, if
    any, is the worker's business; there are no routing fields to read in it."""

    def __post_init__(self) -> None:
        self.fields = RequestFields()


class ResponseRouter:
    def __init__(
        self,
        router: Router,
        affinity: ResponseAffinity,
        announce: Callable[[str, str], None] | None = None,
    ) -> None:
        self.router = router
        self.affinity = affinity
        self.announce = announce  # (response id, worker URL): to the peers

    # --- creation ----------------------------------------------------------------------------

    async def route(self, request: InferenceRequest) -> Reply:
        """``POST /v1/responses``: routed, and its response's worker remembered."""
        try:
            creation = _creation.decode(request.body)
        except msgspec.DecodeError:  # the routing decode accepted the body: a field's type
            creation = _Creation()
        request.http_only = True
        previous = creation.previous_response_id
        if isinstance(previous, str):
            request.held_by = self._holder(previous, request.request_id)
        reply = await self.router.route(request)
        url = request.worker
        if reply.status != 200 or creation.store is False or url is None:
            return reply
        if isinstance(reply.body, bytes):
            found = whole_response_id(reply.body)
            if found is not None:
                self._learnt(found, url)
        else:
            reply.body = await primed(self._watched(reply.body, url))
        return reply

    def _holder(self, previous: str, request_id: str) -> Worker | None:
        """The worker holding ``previous``: None when unknown or removed (the policy
        chooses); an unavailable one is returned, and passed over by ``Router.select``."""
        facts = {"previous_response_id": previous, "request_id": request_id}
        url = self.affinity.worker_of(previous)
        if url is None:
            log.debug("previous response unknown here; routing by policy", extra=facts)
            return None
        worker = self.router.registry.get_by_url(url)
        if worker is None:
            log.info("previous response's worker was removed; routing by policy", extra=facts)
        elif not worker.state.available:
            log.info("previous response's worker is unavailable; routing by policy", extra=facts)
        return worker

    async def _watched(self, chunks: Stream, url: str) -> Chunks:
        """The stream, relayed; its first events read until the response's id is found."""
        try:
            yield b""  # primed: see protocols/reply.py
            finder = StreamIdFinder()
            async for chunk in chunks:
                found = finder.feed(chunk)  # before the client sees it: a GET may follow
                if found is not None:
                    self._learnt(found, url)
                yield chunk
                if finder.done:
                    break
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    def _learnt(self, response_id: str, url: str) -> None:
        self.affinity.remember(response_id, url)
        if self.announce is not None:
            self.announce(response_id, url)

    # --- stored responses --------------------------------------------------------------------

    async def stored(self, request: InferenceRequest, response_id: str, path: str) -> Reply:
        """``request`` (about ``response_id``, sent to ``path``) answered by the worker that
        created the response, or a 404 saying why not."""
        url = self.affinity.worker_of(response_id)
        if url is None:
            affinity = self.affinity
            raise ApiError(
                404,
                "response_not_found",
                f"response '{response_id}' is not known to this gateway: it was not created "
                f"through it, or was forgotten (it keeps {affinity.max_entries} responses "
                f"for {affinity.ttl_secs:g} s)",
            )
        worker = self.router.registry.get_by_url(url)
        if worker is None:
            raise ApiError(
                404,
                "response_worker_removed",
                f"response '{response_id}' was stored by a worker that has since been removed "
                "from the gateway",
            )
        return await self.router.forward(worker, request, path)


def whole_response_id(body: bytes) -> str | None:
    """The ``id`` of a whole Responses API answer."""
    try:
        found = _created.decode(body).id
    except msgspec.DecodeError:
        return None
    return found if isinstance(found, str) and found else None


class StreamIdFinder:
    """The response's id, from the first events of a Responses API stream.

    The id comes in the first event (``response.created``, whose ``response`` is the
    response so far); events may be cut anywhere between chunks, so the incomplete last line
    is kept for the next chunk. Only ``data:`` lines are decoded, each with a decoder that
    skips all but ``response.id``. ``done`` once the id is found, or after ``MAX_EVENTS``
    events or ``MAX_BYTES`` without one (not a stream of this API): the rest is not looked at.
    """

    MAX_EVENTS = 4
    MAX_BYTES = 64 * 1024

    __slots__ = ("_events", "_tail", "done")

    def __init__(self) -> None:
        self._tail = b""
        self._events = 0
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            self._events += 1
            found = _event_id(line[5:])
            if found is not None or self._events >= self.MAX_EVENTS:
                self.done = True
                return found
        if len(self._tail) > self.MAX_BYTES:
            self.done = True
        return None


def _event_id(data: bytes) -> str | None:
    try:
        response = _event.decode(data).response
    except msgspec.DecodeError:
        return None
    if response is None or not isinstance(response.id, str) or not response.id:
        return None
    return response.id
