"""The simulated worker's HTTP API: SGLang's worker endpoints and the OpenAI API.

A sim playing a PD leg (``--disaggregation-mode``) answers inference with ``pd_http.py``.

Every response names the worker in ``X-Worker-Id`` so tests can see where requests went.
Faults (``/sim/faults``) let tests break the worker on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from shunter.protocols.reply import JSON_CONTENT, SSE_CONTENT
from shunter.sim.config import SimConfig
from shunter.sim.disconnect import DisconnectWatch
from shunter.sim.engine import Engine, Generation, tokenize
from shunter.sim.formats import ChatFormat, CompletionFormat, Format, GenerateFormat
from shunter.sim.messages import MessagesEndpoints
from shunter.sim.pd import Disaggregation
from shunter.sim.pd_http import PdEndpoints
from shunter.sim.request import (
    BadRequest,
    DroppedConnection,
    Request,
    chat_prompt,
    error_body,
    max_tokens_of,
)
from shunter.sim.responses import PREFIX as RESPONSES_PREFIX
from shunter.sim.responses import SimResponses
from shunter.sim.send import end_stream, send_bytes, send_chunk, start_stream
from shunter.wire.asgi import Receive, Scope, Send, header_value

# SGLang's /v1/loads ``include`` sections.
V1_LOADS_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})

log = logging.getLogger("shunter.sim")

Handler = Callable[["Request"], Awaitable[None]]


class SimApp:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.worker = config.name.encode()
        sglang: dict[str, Handler] = {
            "/server_info": self.server_info,
            "/get_server_info": self.server_info,
            "/model_info": self.model_info,
            "/get_model_info": self.model_info,
            "/generate": self.generate,
            "/get_load": self.get_load,
            "/v1/loads": self.v1_loads,
            "/flush_cache": self.flush_cache,
            "/health_generate": self.health_generate,
        }
        # llama.cpp's slot API: the list, and POST /slots/{id}?action=erase (by prefix);
        # its /props, with the slot count.
        llamacpp: dict[str, Handler] = {"/slots": self.slots, "/props": self.props}
        # vLLM's dev-mode flush (VLLM_SERVER_DEV_MODE=1).
        vllm: dict[str, Handler] = {"/reset_prefix_cache": self.reset_prefix_cache}
        common: dict[str, Handler] = {
            "/health": self.health,
            "/metrics": self.metrics,
            "/v1/models": self.models,
            "/v1/chat/completions": self.chat,
            "/v1/completions": self.completions,
            "/v1/embeddings": self.embeddings,
            "/v1/rerank": self.rerank,
            "/sim/faults": self.faults,
            "/sim/stats": self.sim_stats,
            "/sim/requests": self.sim_requests,
        }
        # The last inference requests as received, so tests can check what the gateway sent.
        self.recent: deque[dict[str, Any]] = deque(maxlen=64)
        own = {"sglang": sglang, "llamacpp": llamacpp, "vllm": vllm}.get(config.runtime, {})
        self.routes = {**common, **own}
        self.responses = SimResponses(self)  # the Responses API, stored responses included
        self.routes |= self.responses.routes()
        self.routes |= MessagesEndpoints(self).routes(config.runtime)  # Anthropic, tokenize
        # A PD leg (--disaggregation-mode prefill|decode) answers inference as one.
        self.pd: Disaggregation | None = None
        if config.disaggregation_mode != "null":
            self.pd = Disaggregation(config)
            self.routes |= PdEndpoints(self, self.pd).routes()
        self._inference = {
            "/generate",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/rerank",
            *self.responses.routes(),
            "/v1/messages",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler = self.routes.get(scope["path"])
        if handler is None and "/slots" in self.routes and scope["path"].startswith("/slots/"):
            handler = self.slot_action
        if handler is None and scope["path"].startswith(RESPONSES_PREFIX):
            handler = self.responses.stored_route
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Request(scope, receive, send, body, self.worker)
        if handler is None:
            await request.reply(404, error_body(f"no route {scope['path']}", 404))
            return
        try:
            if scope["path"] in self._inference:
                request.record = self._record(scope, body)
                await self._inference_gate(request)
            await handler(request)
        except BadRequest as exc:
            await request.reply(exc.status, error_body(str(exc), exc.status))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except OSError as exc:  # the bootstrap port is taken
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        """What runs beside the API: a prefill's bootstrap server, the KV event publisher."""
        if self.pd is not None:
            await self.pd.start()
        if self.engine.kv_events is not None:
            await self.engine.kv_events.start()

    async def stop(self) -> None:
        if self.pd is not None:
            await self.pd.stop()
        if self.engine.kv_events is not None:
            await self.engine.kv_events.stop()

    def _record(self, scope: Scope, body: bytes) -> dict[str, Any]:
        """An inference request's entry in /sim/requests. ``role`` is this sim's PD mode,
        ``rooms`` the bootstrap rooms (or vLLM transfer ids) it carried, ``aborted`` whether
        its client left before the response was complete."""
        headers: dict[str, list[str]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1"), []).append(value.decode("latin-1"))
        record = {
            "path": scope["path"],
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "role": self.config.disaggregation_mode,
            "rooms": [],
            "aborted": False,
        }
        self.recent.append(record)
        return record

    async def _inference_gate(self, request: Request) -> None:
        """Auth and the faults that act before any work: latency, hang, error rate, poison."""
        key = self.config.api_key
        if key is not None:
            auth = header_value(request.scope, b"authorization")
            if auth != f"Bearer {key}".encode():
                raise BadRequest("invalid or missing API key", 401)
        faults = self.config.faults
        if faults.extra_latency_ms > 0:
            await asyncio.sleep(faults.extra_latency_ms / 1000)
        if faults.hang:
            await self._hang(request)
        if faults.error_rate > 0 and random.random() < faults.error_rate:
            raise BadRequest("injected fault", faults.error_status)
        if faults.poison_text and faults.poison_text.encode() in request.body:
            raise BadRequest("injected fault: poison input", 500)

    async def _hang(self, request: Request) -> None:
        watch = DisconnectWatch(request.receive)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                self.engine.stats.aborted_total += 1
                request.record["aborted"] = True
                raise DroppedConnection("client left a hanging request") from None
            raise

    # --- health and metadata -------------------------------------------------------------

    async def health(self, request: Request) -> None:
        if self.config.faults.fail_health:
            await request.reply_text(503, "unhealthy (injected fault)")
            return
        await send_bytes(request.send, 200, b"", [request.worker_header])

    async def health_generate(self, request: Request) -> None:
        if self.config.faults.fail_health:
            await request.reply_text(503, "unhealthy (injected fault)")
            return
        generation = Generation(tokenize("health check"), 1)
        async for _ in self.engine.run(generation):
            pass
        await send_bytes(request.send, 200, b"", [request.worker_header])

    async def server_info(self, request: Request) -> None:
        name = self.config.served_model_name
        await request.reply(
            200,
            {
                "model_path": name,
                "served_model_name": name,
                "tokenizer_path": name,
                "dp_size": self.config.dp_size,
                "tp_size": 1,
                "max_running_requests": self.config.max_running,
                "version": "shunter-sim",
                "disaggregation_mode": self.config.disaggregation_mode,
                "disaggregation_bootstrap_port": self.config.disaggregation_bootstrap_port,
                **self._kv_events_info(),
            },
        )

    def _kv_events_info(self) -> dict[str, Any]:
        """Where the KV events are published, as SGLang advertises it (the SGLang format
        only: a vLLM-format sim plays vLLM, which does not say)."""
        endpoint = self.config.kv_events_endpoint
        if not endpoint or self.config.kv_events_format != "sglang":
            return {}
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        if not port.isdigit():
            return {}
        return {
            "kv_events": {
                "endpoint_host": host,
                "endpoint_port_base": int(port),
                "dp_size": self.config.dp_size,
            }
        }

    async def model_info(self, request: Request) -> None:
        name = self.config.served_model_name
        await request.reply(
            200,
            {
                "model_path": name,
                "tokenizer_path": name,
                "is_generation": True,
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
            },
        )

    async def models(self, request: Request) -> None:
        owners = {"sglang": "sglang", "llamacpp": "llamacpp", "vllm": "vllm"}
        owner = owners.get(self.config.runtime, "shunter-sim")
        await request.reply(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.served_model_name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": owner,
                    }
                ],
            },
        )

    async def get_load(self, request: Request) -> None:
        engine = self.engine
        await request.reply(
            200,
            [
                {
                    "dp_rank": 0,
                    "num_reqs": engine.running + engine.waiting,
                    "num_waiting_reqs": engine.waiting,
                    "num_tokens": engine.tokens_in_flight,
                }
            ],
        )

    async def v1_loads(self, request: Request) -> None:
        """SGLang's current load endpoint, as it answers it: one entry per DP rank (the sim
        has one) of the scheduler's scalars (``include=core``; the other sections are
        SGLang's memory, speculative, LoRA, disaggregation and queue details, which the sim
        does not model), an unknown section a 400."""
        query = parse_qs(request.scope["query_string"].decode("latin-1"))
        include = {part.strip() for value in query.get("include", ()) for part in value.split(",")}
        unknown = include - V1_LOADS_SECTIONS
        if unknown:
            raise BadRequest(
                f"Invalid include sections: {sorted(unknown)}. "
                f"Valid options: {sorted(V1_LOADS_SECTIONS)}"
            )
        engine, config = self.engine, self.config
        used = engine.tokens_in_flight
        await request.reply(
            200,
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "version": "shunter-sim",
                "accelerator": None,
                "num_accelerators": 1,
                "loads": [
                    {
                        "dp_rank": 0,
                        "num_running_reqs": engine.running,
                        "num_waiting_reqs": engine.waiting,
                        "num_used_tokens": used,
                        "num_total_tokens": used,
                        "max_total_num_tokens": config.cache_tokens,
                        "max_running_requests": config.max_running,
                        "token_usage": round(used / config.cache_tokens, 6)
                        if config.cache_tokens
                        else 0.0,
                        "cache_hit_rate": engine.cache.hit_rate,
                    }
                ],
            },
        )

    async def slots(self, request: Request) -> None:
        ids = range(self.config.max_running)
        await request.reply(200, [{"id": i, "is_processing": False} for i in ids])

    async def props(self, request: Request) -> None:
        """llama.cpp's ``GET /props``, the part gateways read: ``total_slots``."""
        model = self.config.served_model_name
        await request.reply(200, {"total_slots": self.config.max_running, "model_alias": model})

    async def slot_action(self, request: Request) -> None:
        """``POST /slots/{id}?action=erase``. The sim's cache is shared by its slots, so
        erasing any slot empties all of it: enough to see a flush reach the engine."""
        slot = request.scope["path"][len("/slots/") :]
        query = request.scope["query_string"].decode("latin-1")
        if request.scope["method"] != "POST" or query != "action=erase":
            raise BadRequest("only POST /slots/{id}?action=erase is simulated")
        if not slot.isdigit() or int(slot) >= self.config.max_running:
            raise BadRequest(f"no slot {slot}")
        self.engine.cache.flush()
        await request.reply(200, {"id_slot": int(slot), "n_erased": 0})

    async def flush_cache(self, request: Request) -> None:
        self.engine.cache.flush()
        await request.reply_text(200, "Cache flushed.\n")

    async def reset_prefix_cache(self, request: Request) -> None:
        if request.scope["method"] != "POST":
            raise BadRequest("POST /reset_prefix_cache", 405)
        self.engine.cache.flush()
        await send_bytes(request.send, 200, b"", [request.worker_header])

    async def metrics(self, request: Request) -> None:
        body = self.engine.metrics_text().encode()
        headers = [(b"content-type", b"text/plain; version=0.0.4"), request.worker_header]
        await send_bytes(request.send, 200, body, headers)

    async def faults(self, request: Request) -> None:
        if request.scope["method"] == "POST":
            try:
                self.config.faults.update(request.json())
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            log.info("faults now %s", self.config.faults.as_dict())
        await request.reply(200, self.config.faults.as_dict())

    async def sim_stats(self, request: Request) -> None:
        s = self.engine.stats
        await request.reply(
            200,
            {
                "worker_id": self.config.name,
                "requests_total": s.requests_total,
                "aborted_total": s.aborted_total,
                "prompt_tokens_total": s.prompt_tokens_total,
                "cached_tokens_total": s.cached_tokens_total,
                "generation_tokens_total": s.generation_tokens_total,
                "abort_rpcs": s.abort_rpcs,
                "grpc_connections": len(s.grpc_peers),
                "running": self.engine.running,
                "waiting": self.engine.waiting,
                "cache_hit_rate": self.engine.cache.hit_rate,
                "bootstrap_rooms": len(self.pd.rooms) if self.pd is not None else 0,
            },
        )

    async def sim_requests(self, request: Request) -> None:
        await request.reply(200, list(self.recent))

    # --- inference -------------------------------------------------------------------------

    async def chat(self, request: Request) -> None:
        body = request.json()
        prompt = chat_prompt(body.get("messages"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        await self._complete(
            request, body, prompt, max_tokens_of(limit, self.config.max_tokens), ChatFormat
        )

    async def completions(self, request: Request) -> None:
        body = request.json()
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string or a list of strings")
        limit = max_tokens_of(body.get("max_tokens"), self.config.max_tokens)
        await self._complete(request, body, prompt, limit, CompletionFormat)

    async def generate(self, request: Request) -> None:
        body = request.json()
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("'sampling_params' must be an object")
        if isinstance(body.get("input_ids"), list):
            prompt = " ".join(str(t) for t in body["input_ids"])
        elif isinstance(body.get("text"), str):
            prompt = body["text"]
        else:
            raise BadRequest("give 'text' or 'input_ids'")
        limit = max_tokens_of(params.get("max_new_tokens"), self.config.max_tokens)
        await self._complete(request, body, prompt, limit, GenerateFormat)

    async def _complete(
        self,
        request: Request,
        body: dict[str, Any],
        prompt: str,
        max_tokens: int,
        format_class: type[Format],
    ) -> None:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        fmt = format_class(body.get("model") or self.config.served_model_name, include_usage)
        generation = Generation(tokenize(prompt), max_tokens)
        await self.respond(request, body, fmt, generation)

    async def respond(
        self,
        request: Request,
        body: dict[str, Any],
        fmt: Format,
        generation: Generation,
        source: AsyncIterator[str] | None = None,
    ) -> None:
        """Answer one sequence, whole or streamed as the body asks. Its tokens come from
        the engine, or from ``source`` when they were computed already (a PD prefill's)."""
        tokens_of = self.engine.run(generation) if source is None else source
        if body.get("stream"):
            await self._stream(request, fmt, generation, tokens_of)
            return
        watch = DisconnectWatch(request.receive)
        tokens: list[str] = []
        try:
            async for token in tokens_of:
                tokens.append(token)
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                request.record["aborted"] = True
                return
            raise
        watch.finish()
        payload = orjson.dumps(fmt.whole(" ".join(tokens), generation))
        if self.config.faults.drop_after_chunks >= 0:
            await self._drop_mid_body(request, len(payload))
        await send_bytes(request.send, 200, payload, [JSON_CONTENT, request.worker_header])

    async def _drop_mid_body(self, request: Request, length: int) -> None:
        headers = [JSON_CONTENT, request.worker_header, (b"content-length", str(length).encode())]
        await start_stream(request.send, 200, headers)
        raise DroppedConnection("injected fault: connection dropped mid-body")

    async def _stream(
        self, request: Request, fmt: Format, generation: Generation, tokens: AsyncIterator[str]
    ) -> None:
        send = request.send
        drop_after = self.config.faults.drop_after_chunks
        watch = DisconnectWatch(request.receive)
        try:
            await start_stream(send, 200, [SSE_CONTENT, request.worker_header])
            sent = 0
            first = fmt.first_chunk()
            text = ""
            async for token in tokens:
                if first is not None:
                    await send_chunk(send, first)
                    first = None
                text = f"{text} {token}" if text else token
                await send_chunk(send, fmt.chunk(token, text, generation))
                sent += 1
                if sent == drop_after:
                    raise DroppedConnection("injected fault: stream dropped")
            for chunk in fmt.final_chunks(generation):
                await send_chunk(send, chunk)
            watch.finish()
            await end_stream(send)
        except asyncio.CancelledError:
            if watch.absorb_cancel():
                request.record["aborted"] = True
                return
            raise

    async def embeddings(self, request: Request) -> None:
        body = request.json()
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("'input' must be a string or a non-empty list")
        texts = [str(i) for i in inputs]
        tokens = sum(len(tokenize(t)) for t in texts)
        data = [
            {"object": "embedding", "index": i, "embedding": self.engine.embed(t)}
            for i, t in enumerate(texts)
        ]
        model = body.get("model") or self.config.served_model_name
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        await request.reply(200, {"object": "list", "data": data, "model": model, "usage": usage})

    async def rerank(self, request: Request) -> None:
        body = request.json()
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list) or not documents:
            raise BadRequest("give a 'query' string and a non-empty 'documents' list")
        words = set(tokenize(query.lower()))
        results = []
        for index, document in enumerate(documents):
            doc_words = set(tokenize(str(document).lower()))
            score = len(words & doc_words) / (len(words | doc_words) or 1)
            results.append({"score": score, "document": document, "index": index})
        results.sort(key=lambda r: -float(r["score"]))
        await request.reply(200, results)
