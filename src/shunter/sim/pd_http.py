"""The inference endpoints of a PD sim over HTTP: SGLang's rooms and vLLM's two phases.

SGLang (``/generate``, chat, completions): both legs carry ``bootstrap_host``,
``bootstrap_port`` and ``bootstrap_room`` (arrays for a batch). The prefill prefills,
publishes its rooms and answers one token once the decode has claimed them all; the decode
claims its rooms, then generates as a regular sim. With ``return_logprob`` (``/generate``)
the prompt's logprobs are in the prefill's answer and the decode's list is empty.

vLLM (chat, completions; NIXL connector): the prefill gets ``kv_transfer_params:
{do_remote_decode: true}``, ``max_tokens: 1`` and no stream, answers at once with the
parameters the decode needs to pull its KV, and the gateway sends those in the decode's
body. The decode pulls, then generates.

A client that leaves (the gateway cancelling a leg) marks the request's record aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from shunter.sim.batch import BatchItem, answer_batch, share_response_id
from shunter.sim.bootstrap import BootstrapTimeout
from shunter.sim.disconnect import DisconnectWatch
from shunter.sim.engine import Generation, tokenize
from shunter.sim.formats import ChatFormat, CompletionFormat, Format, GenerateFormat
from shunter.sim.logprobs import input_token_logprobs, token_id
from shunter.sim.pd import Disaggregation, all_or_none
from shunter.sim.pd_fields import (
    Bootstrap,
    PdFieldError,
    bootstrap_items,
    nixl_transfer_params,
    vllm_decode_params,
    vllm_prefill_params,
)
from shunter.sim.request import BadRequest, Request, chat_prompt, max_tokens_of
from shunter.sim.rooms import Room, RoomInUse

if TYPE_CHECKING:
    from shunter.sim.app import SimApp

Handler = Callable[[Request], Awaitable[None]]
Prompts = list[list[str]]  # one token list per item


def _generate_prompts(body: dict[str, Any]) -> tuple[Prompts, int | None]:
    """``/generate``'s items and batch size (None: one prompt, not a batch)."""
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(ids, list):
        if ids and all(isinstance(seq, list) for seq in ids):
            return [[str(t) for t in seq] for seq in ids], len(ids)
        return [[str(t) for t in ids]], None
    if isinstance(text, str):
        return [tokenize(text)], None
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [tokenize(t) for t in text], len(text)
    raise BadRequest("give 'text' or 'input_ids'")


def _completion_prompts(body: dict[str, Any]) -> tuple[Prompts, int | None]:
    """A completion's items: a list ``prompt`` is a batch, unless it is one prompt's token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenize(prompt)], None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [[str(p) for p in prompt]], None
        items: Prompts = []
        for p in prompt:
            if isinstance(p, str):
                items.append(tokenize(p))
            elif isinstance(p, list):
                items.append([str(t) for t in p])
            else:
                raise BadRequest("'prompt' must be a string or a list of strings")
        return items, len(items)
    raise BadRequest("'prompt' must be a string or a list of strings")


def _chat_limit(body: dict[str, Any]) -> Any:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def _logprob_starts(body: dict[str, Any], count: int) -> list[int]:
    """``logprob_start_len`` per item: one integer for all, or (a batch) one each."""
    start = body.get("logprob_start_len", 0)
    starts = start if isinstance(start, list) else [start] * count
    if len(starts) != count or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in starts
    ):
        raise BadRequest("'logprob_start_len' must be an integer (or one per batch item)")
    return starts


async def _replay(token: str) -> AsyncIterator[str]:
    """The prefill's one token, computed before its answer could be sent."""
    yield token


class PdEndpoints:
    def __init__(self, app: SimApp, pd: Disaggregation) -> None:
        self.app = app
        self.pd = pd
        self.config = app.config
        self.engine = app.engine

    def routes(self) -> dict[str, Handler]:
        if self.config.runtime == "vllm":
            return {
                "/v1/chat/completions": self.vllm_chat,
                "/v1/completions": self.vllm_completions,
            }
        return {
            "/generate": self.generate,
            "/v1/chat/completions": self.chat,
            "/v1/completions": self.completions,
        }

    # --- SGLang: bootstrap rooms ---------------------------------------------------------

    async def generate(self, request: Request) -> None:
        body = request.json()
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("'sampling_params' must be an object")
        prompts, batch = _generate_prompts(body)
        limit = max_tokens_of(params.get("max_new_tokens"), self.config.max_tokens)
        await self._sglang(request, body, prompts, batch, limit, GenerateFormat)

    async def chat(self, request: Request) -> None:
        body = request.json()
        prompt = tokenize(chat_prompt(body.get("messages")))
        n = body.get("n")
        batch = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else None
        prompts = [list(prompt) for _ in range(batch or 1)]
        limit = max_tokens_of(_chat_limit(body), self.config.max_tokens)
        await self._sglang(request, body, prompts, batch, limit, ChatFormat, shared_prompt=True)

    async def completions(self, request: Request) -> None:
        body = request.json()
        prompts, batch = _completion_prompts(body)
        limit = max_tokens_of(body.get("max_tokens"), self.config.max_tokens)
        await self._sglang(request, body, prompts, batch, limit, CompletionFormat)

    async def _sglang(
        self,
        request: Request,
        body: dict[str, Any],
        prompts: Prompts,
        batch: int | None,
        limit: int,
        format_class: type[Format],
        shared_prompt: bool = False,
    ) -> None:
        role = self.pd.mode
        try:
            legs = bootstrap_items(body, role, batch)
        except PdFieldError as exc:
            raise BadRequest(str(exc)) from None
        request.record["rooms"] = [leg.room for leg in legs]
        logprobs = format_class is GenerateFormat and body.get("return_logprob") is True
        starts = _logprob_starts(body, len(prompts)) if logprobs and role == "prefill" else []
        formats = []
        for i, prompt in enumerate(prompts):
            input_logprobs: list[Any] | None = None
            if logprobs:  # the prompt's, at the prefill; none at the decode
                ids = [token_id(t) for t in prompt]
                input_logprobs = input_token_logprobs(ids, starts[i]) if starts else []
            index = None if batch is None else i
            formats.append(self._format(body, format_class, index, input_logprobs))
        if role == "prefill":
            await self._prefill(request, body, prompts, legs, formats, shared_prompt)
        else:
            await self._decode(request, body, prompts, legs, formats, limit, shared_prompt)

    async def _prefill(
        self,
        request: Request,
        body: dict[str, Any],
        prompts: Prompts,
        legs: Sequence[Bootstrap],
        formats: Sequence[Format],
        shared_prompt: bool,
    ) -> None:
        """Prefill every item and publish its room, then hold until all are claimed."""
        generations = [Generation(prompt, 1) for prompt in prompts]
        rooms: list[Room] = []

        async def prefill_one(generation: Generation, leg: Bootstrap) -> str:
            token = await self._prefill_one(generation)
            info = self._room_info(leg.room, generation)
            rooms.append(self.pd.publish(str(leg.room), info))
            return token

        watch = DisconnectWatch(request.receive)
        try:
            tokens = await all_or_none(
                [prefill_one(g, leg) for g, leg in zip(generations, legs, strict=True)]
            )
            await self.pd.hold(rooms)
        except (RoomInUse, BootstrapTimeout) as exc:
            watch.finish()
            raise BadRequest(str(exc), 400 if isinstance(exc, RoomInUse) else 500) from None
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                self._aborted(request, engine_counted=not all(g.finished for g in generations))
                return
            raise
        finally:
            self.pd.forget(rooms)
        watch.finish()
        sources = [_replay(token) for token in tokens]
        await self._answer(request, body, formats, generations, sources, shared_prompt)

    async def _decode(
        self,
        request: Request,
        body: dict[str, Any],
        prompts: Prompts,
        legs: Sequence[Bootstrap],
        formats: Sequence[Format],
        limit: int,
        shared_prompt: bool,
    ) -> None:
        """Claim every item's room at its prefill, then generate as a regular sim."""
        sources = [(leg.host, leg.port, str(leg.room)) for leg in legs]
        if not await self._pull(request, sources):
            return
        generations = [Generation(prompt, limit) for prompt in prompts]
        runs = [self.engine.run(g) for g in generations]
        await self._answer(request, body, formats, generations, runs, shared_prompt)

    # --- vLLM: two phases, kv_transfer_params ----------------------------------------------

    async def vllm_chat(self, request: Request) -> None:
        body = request.json()
        prompt = tokenize(chat_prompt(body.get("messages")))
        await self._vllm(request, body, prompt, _chat_limit(body), ChatFormat)

    async def vllm_completions(self, request: Request) -> None:
        body = request.json()
        prompts, batch = _completion_prompts(body)
        if batch is not None and batch > 1:
            raise BadRequest("a vLLM PD leg takes one prompt: kv_transfer_params name one transfer")
        await self._vllm(request, body, prompts[0], body.get("max_tokens"), CompletionFormat)

    async def _vllm(
        self,
        request: Request,
        body: dict[str, Any],
        prompt: list[str],
        limit: Any,
        format_class: type[Format],
    ) -> None:
        if self.pd.mode == "prefill":
            await self._vllm_prefill(request, body, prompt, limit, format_class)
        else:
            await self._vllm_decode(request, body, prompt, limit, format_class)

    async def _vllm_prefill(
        self,
        request: Request,
        body: dict[str, Any],
        prompt: list[str],
        limit: Any,
        format_class: type[Format],
    ) -> None:
        """Prefill, register the transfer, answer at once: vLLM does not wait for the decode
        (the transfer waits at the prefill, for the bootstrap timeout at most)."""
        try:
            vllm_prefill_params(body)
        except PdFieldError as exc:
            raise BadRequest(str(exc)) from None
        if limit != 1 or body.get("stream"):
            raise BadRequest(
                "a vLLM prefill leg expects max_tokens 1 and stream false "
                f"(got max_tokens {limit}, stream {bool(body.get('stream'))})"
            )
        generation = Generation(prompt, 1)
        watch = DisconnectWatch(request.receive)
        try:
            token = await self._prefill_one(generation)
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                self._aborted(request, engine_counted=not generation.finished)
                return
            raise
        watch.finish()
        config = self.config
        params = nixl_transfer_params(
            config.name, self.pd.host, self.pd.bootstrap_port, len(prompt), config.block_size
        )
        transfer = params["remote_request_id"]
        self.pd.publish(transfer, self._room_info(transfer, generation))
        request.record["rooms"] = [transfer]
        payload = self._format(body, format_class, None, None).whole(token, generation)
        payload["kv_transfer_params"] = params
        await request.reply(200, payload)

    async def _vllm_decode(
        self,
        request: Request,
        body: dict[str, Any],
        prompt: list[str],
        limit: Any,
        format_class: type[Format],
    ) -> None:
        """Pull the KV the prefill's kv_transfer_params name, then generate. A request
        without them is served whole, prompt included, as a vLLM decode worker running its
        connector as ``kv_both`` does (a gateway sends it a prompt too short to disaggregate)."""
        if body.get("kv_transfer_params") is None:
            generation = Generation(prompt, max_tokens_of(limit, self.config.max_tokens))
            fmt = self._format(body, format_class, None, None)
            await self.app.respond(request, body, fmt, generation)
            return
        try:
            remote = vllm_decode_params(body)
        except PdFieldError as exc:
            raise BadRequest(str(exc)) from None
        request.record["rooms"] = [remote.request_id]
        if not await self._pull(request, [(remote.host, remote.port, remote.request_id)]):
            return
        generation = Generation(prompt, max_tokens_of(limit, self.config.max_tokens))
        fmt = self._format(body, format_class, None, None)
        await self.app.respond(request, body, fmt, generation)

    # --- shared --------------------------------------------------------------------------

    def _format(
        self,
        body: dict[str, Any],
        format_class: type[Format],
        index: int | None,
        input_logprobs: list[Any] | None,
    ) -> Format:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        model = body.get("model") or self.config.served_model_name
        return format_class(model, include_usage, index=index, input_logprobs=input_logprobs)

    async def _prefill_one(self, generation: Generation) -> str:
        """The engine's prefill (queue, prompt time, prefix cache) and its one output token."""
        tokens = [token async for token in self.engine.run(generation)]
        return tokens[0]

    @staticmethod
    def _room_info(room: int | str, generation: Generation) -> dict[str, Any]:
        return {
            "room": room,
            "prompt_tokens": len(generation.prompt_tokens),
            "cached_tokens": generation.cached_tokens,
        }

    async def _pull(self, request: Request, sources: list[tuple[str, int | None, str]]) -> bool:
        """Claim the rooms; False when the client left while waiting (nothing to answer)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        watch = DisconnectWatch(request.receive)
        try:
            await self.pd.pull(sources)
        except BootstrapTimeout as exc:
            watch.finish()
            raise BadRequest(str(exc), 500) from None
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                self._aborted(request, engine_counted=False)
                return False
            raise
        finally:
            request.record["bootstrap_wait_ms"] = round((loop.time() - started) * 1000, 1)
        watch.finish()
        return True

    def _aborted(self, request: Request, engine_counted: bool) -> None:
        """The client left: the record says so, and the abort is counted once."""
        request.record["aborted"] = True
        if not engine_counted:
            self.engine.stats.aborted_total += 1

    async def _answer(
        self,
        request: Request,
        body: dict[str, Any],
        formats: Sequence[Format],
        generations: Sequence[Generation],
        sources: Sequence[AsyncIterator[str]],
        shared_prompt: bool,
    ) -> None:
        if formats[0].index is None:  # one prompt: exactly a regular sim's answer
            await self.app.respond(request, body, formats[0], generations[0], sources[0])
            return
        if not isinstance(formats[0], GenerateFormat):
            share_response_id(formats)
        items = [BatchItem(f, g, s) for f, g, s in zip(formats, generations, sources, strict=True)]
        stream = bool(body.get("stream"))
        drop_after = self.config.faults.drop_after_chunks
        await answer_batch(request, items, stream, shared_prompt, drop_after)
