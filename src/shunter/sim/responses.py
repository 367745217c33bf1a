"""The Responses API as vLLM and SGLang serve it: ``/v1/responses``, stored in the worker.

``POST /v1/responses`` runs on the same engine as chat (its prefix cache, its queue, its
faults): the prompt is the chat template's rendering of the instructions, the conversation
so far (``previous_response_id``: every earlier turn's input and output, as the engines
rebuild it) and this input. So a continuation's prompt starts with the previous turn's, and
a worker that served that turn reports it cached. The answer is a response object whole,
or the Responses stream (``response.created`` … ``response.output_text.delta`` …
``response.completed``, no ``[DONE]``).

Unless ``store`` is false, the response is kept (the newest ``MAX_STORED``) and served by
``GET``/``DELETE /v1/responses/{id}`` and ``GET .../input_items``; ``POST .../cancel``
refuses, as every response here is synchronous. A ``previous_response_id`` this worker does
not hold is a 404, as the engines answer it.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shunter.sim.engine import Generation, tokenize
from shunter.sim.formats import Format, sse
from shunter.sim.request import BadRequest, Request, max_tokens_of
from shunter.tokenizer.words import chat_text

if TYPE_CHECKING:
    from shunter.sim.app import SimApp

PATH = "/v1/responses"
PREFIX = PATH + "/"
MAX_STORED = 10_000


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # this turn's, as the API lists them
    conversation: list[dict[str, Any]]  # every turn's messages, this one's answer included


class SimResponses:
    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.stored: OrderedDict[str, Stored] = OrderedDict()

    def routes(self) -> dict[str, Callable[[Request], Any]]:
        return {PATH: self.create}

    # --- creation ----------------------------------------------------------------------------

    async def create(self, request: Request) -> None:
        if request.scope["method"] != "POST":
            raise BadRequest(f"use POST {PATH}", 405)
        body = request.json()
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            held = self.stored.get(previous) if isinstance(previous, str) else None
            if held is None:
                raise BadRequest(f"Response with id '{previous}' not found.", 404)
            history = held.conversation
        items = input_items(body.get("input"))
        conversation = [*history, *({"role": i["role"], "content": i["content"]} for i in items)]
        instructions = body.get("instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        prompt = chat_text([*system, *conversation])
        limit = max_tokens_of(body.get("max_output_tokens"), self.app.config.max_tokens)
        model = body.get("model") or self.app.config.served_model_name

        def done(response: dict[str, Any], text: str) -> None:
            if body.get("store", True) is not False:
                answer = {"role": "assistant", "content": text}
                self._keep(response["id"], Stored(response, items, [*conversation, answer]))

        fmt = ResponsesFormat(model, body, done)
        await self.app.respond(request, body, fmt, Generation(tokenize(prompt), limit))

    def _keep(self, response_id: str, stored: Stored) -> None:
        self.stored[response_id] = stored
        while len(self.stored) > MAX_STORED:
            self.stored.popitem(last=False)

    # --- stored responses --------------------------------------------------------------------

    async def stored_route(self, request: Request) -> None:
        """``/v1/responses/{id}`` (GET, DELETE), ``.../input_items`` (GET), ``.../cancel``."""
        response_id, _, action = request.scope["path"][len(PREFIX) :].partition("/")
        method = request.scope["method"]
        allowed = {"": ("GET", "DELETE"), "input_items": ("GET",), "cancel": ("POST",)}
        if action not in allowed:
            raise BadRequest(f"no route {request.scope['path']}", 404)
        if method not in allowed[action]:
            raise BadRequest(f"{method} is not allowed here", 405)
        held = self.stored.get(response_id)
        if held is None:
            raise BadRequest(f"Response with id '{response_id}' not found.", 404)
        if action == "cancel":
            raise BadRequest("Cannot cancel a synchronous response.", 400)
        if action == "input_items":
            order = dict(_query(request)).get("order", "desc")
            data = held.input_items if order == "asc" else held.input_items[::-1]
            first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
            listing = {
                "object": "list",
                "data": data,
                "first_id": first,
                "last_id": last,
                "has_more": False,
            }
            await request.reply(200, listing)
        elif method == "DELETE":
            del self.stored[response_id]
            await request.reply(200, {"id": response_id, "object": "response", "deleted": True})
        else:
            await request.reply(200, held.response)


def _query(request: Request) -> list[tuple[str, str]]:
    pairs = request.scope["query_string"].decode("latin-1").split("&")
    return [(k, v) for k, _, v in (p.partition("=") for p in pairs if p)]


def input_items(given: Any) -> list[dict[str, Any]]:
    """The request's ``input`` as message items with ids (a string is one user message)."""
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise BadRequest("'input' must be a string or a non-empty list of items")
    items = []
    for item in given:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise BadRequest("the simulated worker takes message items only")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str | list):
            raise BadRequest("a message item needs a 'role' and a 'content'")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        items.append(
            {
                "id": "msg_" + uuid.uuid4().hex,
                "type": "message",
                "role": role,
                "status": "completed",
                "content": content,
            }
        )
    return items


class ResponsesFormat(Format):
    """A response object whole, or the Responses stream's events; ``done`` gets the
    finished response (before the stream's last event goes out) and its text."""

    prefix = "resp_"
    _OPENING = 4  # the events before the first delta: created, in_progress, item and part

    def __init__(
        self,
        model: str,
        body: dict[str, Any],
        done: Callable[[dict[str, Any], str], None],
    ) -> None:
        super().__init__(model)
        self.body = body
        self.done = done
        self.item_id = "msg_" + uuid.uuid4().hex
        self.text = ""
        self._sequence = self._OPENING
        self._opened = False

    def _event(self, kind: str, sequence: int | None = None, **fields: Any) -> bytes:
        if sequence is None:
            sequence, self._sequence = self._sequence, self._sequence + 1
        payload = {"type": kind, "sequence_number": sequence, **fields}
        return b"event: " + kind.encode() + b"\n" + sse(payload)

    def response(
        self, status: str, text: str | None, generation: Generation | None
    ) -> dict[str, Any]:
        body = self.body
        output = [] if text is None else [self._message("completed", text)]
        usage = None
        if generation is not None:
            prompt, completion = len(generation.prompt_tokens), generation.completion_tokens
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": generation.cached_tokens},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.get("metadata") or {},
        }

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [_output_text(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def first_chunk(self) -> bytes:
        """The opening events (sent with the first token, or at the end if none came)."""
        started = self.response("in_progress", None, None)
        where: dict[str, Any] = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return b"".join(
            [
                self._event("response.created", 0, response=started),
                self._event("response.in_progress", 1, response=started),
                self._event(
                    "response.output_item.added",
                    2,
                    output_index=0,
                    item=self._message("in_progress", None),
                ),
                self._event("response.content_part.added", 3, **where, part=_output_text("")),
            ]
        )

    def chunk(self, token: str, text_so_far: str, generation: Generation) -> bytes:
        self._opened = True
        piece = token if generation.completion_tokens == 1 else " " + token
        self.text = text_so_far
        where: dict[str, Any] = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._event("response.output_text.delta", **where, delta=piece, logprobs=[])

    def final_chunks(self, generation: Generation) -> list[bytes]:
        text = self.text
        where: dict[str, Any] = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        finished = self.response("completed", text, generation)
        self.done(finished, text)
        opening = [] if self._opened else [self.first_chunk()]
        return [
            *opening,
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=_output_text(text)),
            self._event(
                "response.output_item.done",
                output_index=0,
                item=self._message("completed", text),
            ),
            self._event("response.completed", response=finished),
        ]

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        finished = self.response("completed", text, generation)
        self.done(finished, text)
        return finished


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
