"""The Responses API's endpoints: ``POST /v1/responses`` and the stored responses' routes.

Creation is an inference request like chat (admission, the router, the streaming relay):
an ``InferenceApi`` whose router is the ``ResponseRouter``. The stored responses' routes
(``/v1/responses/{id}``, ``.../input_items``, ``.../cancel``) go to the worker that created
the response (``routing/responses.py``); they wait for no admission slot, as they make the
worker generate nothing.
"""

from __future__ import annotations

from urllib.parse import quote

from shunter.api.call import Call
from shunter.api.inference import InferenceApi
from shunter.protocols.reply import Reply
from shunter.routing.responses import RESPONSES_PATH, ResponseRouter, StoredResponseRequest

STORED_PREFIX = RESPONSES_PATH + "/"
# What follows ``/v1/responses/{id}``, and the methods each route takes (as OpenAI's API).
STORED_METHODS: dict[str, tuple[str, ...]] = {
    "": ("GET", "DELETE"),
    "/input_items": ("GET",),
    "/cancel": ("POST",),
}


def stored_route(path: str) -> tuple[str, str] | None:
    """``(response id, suffix)`` of a stored response's path (``suffix``: a key of
    ``STORED_METHODS``); None for any other path under ``/v1/responses/``."""
    rest = path[len(STORED_PREFIX) :]
    response_id, slash, tail = rest.partition("/")
    suffix = slash + tail
    if not response_id or suffix not in STORED_METHODS:
        return None
    return response_id, suffix


class ResponsesApi:
    def __init__(
        self, create: InferenceApi, responses: ResponseRouter, gateway_auth: bytes | None = None
    ) -> None:
        self.create = create.handle
        self.responses = responses
        self.gateway_auth = gateway_auth  # "Bearer <--api-key>", never forwarded

    async def stored(self, call: Call) -> Reply:
        """A stored response's route (the app matched the path with ``stored_route``)."""
        found = stored_route(call.path)
        assert found is not None, "the app routes only stored responses' paths here"
        response_id, suffix = found
        scope = call.scope
        headers = scope["headers"]
        if self.gateway_auth is not None:
            headers = [h for h in headers if h != (b"authorization", self.gateway_auth)]
        body = await call.body()
        request = StoredResponseRequest(
            call.method,
            STORED_PREFIX + "{id}" + suffix,  # the endpoint, as metrics name it
            scope["query_string"],
            headers,
            body,
            call.request_id,
            call.started,
        )
        path = STORED_PREFIX + quote(response_id, safe="") + suffix
        try:
            return await self.responses.stored(request, response_id, path)
        finally:
            call.worker = request.worker
