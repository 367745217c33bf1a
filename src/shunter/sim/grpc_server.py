"""`shunter sim --grpc`: the simulated worker speaking SGLang's gRPC scheduler service.

The same engine as the HTTP sim (slots with a queue, prefill cost per uncached token, the
prefix cache, faults), fed with token ids. Output: the engine's deterministic words, encoded
with the sim's own tokenizer (``sim/tokenizer.py``) and sent one token id per step, so
``max_new_tokens`` counts ids as a real engine does. ``GetTokenizer`` hands that tokenizer
to the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2, sglang_scheduler_pb2_grpc

from shunter.sim.config import SimConfig
from shunter.sim.engine import Engine, Generation
from shunter.sim.tokenizer import eos_token_ids, sim_tokenizer, tokenizer_archive

log = logging.getLogger("shunter.sim.grpc")
pb = sglang_scheduler_pb2
_TOKENIZER_CHUNK = 64 * 1024
_STATUS_FOR = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class _Sequence:
    """One output sequence's token ids, produced one id per engine step: the engine's
    words, or a scripted reply followed by end-of-sequence."""

    def __init__(self, engine: Engine, generation: Generation, scripted: str) -> None:
        self.engine = engine
        self.generation = generation
        self.pending: list[int] = []
        self.words = 0
        self.scripted = bool(scripted)  # then never refilled: after the reply, end-of-sequence
        if scripted:
            self.pending = sim_tokenizer().encode(scripted, add_special_tokens=False).ids

    def next_id(self) -> int:
        if not self.pending and self.scripted:
            return eos_token_ids()[0]
        if not self.pending:
            word = self.engine.output_token(self.generation, self.words)
            text = word if self.words == 0 else " " + word
            self.pending = list(sim_tokenizer().encode(text, add_special_tokens=False).ids)
            self.words += 1
        return self.pending.pop(0)


class SchedulerServicer(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):  # type: ignore[misc]
    def __init__(
        self, config: SimConfig, engine: Engine, recent: deque[dict[str, Any]] | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.recent = recent  # the HTTP sim's /sim/requests log: tests read what was sent
        self.started = time.time()
        self.active: dict[str, asyncio.Event] = {}  # request id -> set when aborted

    # --- management ----------------------------------------------------------------------

    async def HealthCheck(self, request: Any, context: Any) -> Any:
        self.engine.stats.grpc_peers.add(context.peer())
        if self.config.faults.fail_health:
            return pb.HealthCheckResponse(healthy=False, message="unhealthy (injected fault)")
        return pb.HealthCheckResponse(healthy=True, message="ok")

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        name = self.config.served_model_name
        return pb.GetModelInfoResponse(
            model_path=name,
            tokenizer_path=name,
            is_generation=True,
            served_model_name=name,
            max_context_length=32768,
            vocab_size=sim_tokenizer().get_vocab_size(),
            model_type="llama",
            eos_token_ids=eos_token_ids(),
            architectures=["LlamaForCausalLM"],
        )

    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        return pb.GetServerInfoResponse(
            active_requests=self.engine.running + self.engine.waiting,
            uptime_seconds=time.time() - self.started,
            sglang_version="shunter-sim",
            server_type="grpc",
        )

    async def GetLoads(self, request: Any, context: Any) -> Any:
        engine = self.engine
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=engine.running,
            num_waiting_reqs=engine.waiting,
            num_total_reqs=engine.running + engine.waiting,
            num_used_tokens=engine.tokens_in_flight,
            cache_hit_rate=engine.cache.hit_rate,
            max_running_requests=self.config.max_running,
        )
        return pb.GetLoadsResponse(dp_rank_count=1, loads=[load])

    async def GetTokenizer(self, request: Any, context: Any) -> AsyncIterator[Any]:
        archive = tokenizer_archive()
        digest = hashlib.sha256(archive).hexdigest()
        for start in range(0, len(archive), _TOKENIZER_CHUNK):
            last = start + _TOKENIZER_CHUNK >= len(archive)
            yield common_pb2.GetTokenizerChunk(
                data=archive[start : start + _TOKENIZER_CHUNK], sha256=digest if last else ""
            )

    async def FlushCache(self, request: Any, context: Any) -> Any:
        self.engine.cache.flush()
        return common_pb2.FlushCacheResponse(success=True, message="Cache flushed.")

    async def Abort(self, request: Any, context: Any) -> Any:
        event = self.active.get(request.request_id)
        self.engine.stats.abort_rpcs += 1
        if event is None:
            return pb.AbortResponse(success=False, message="no such request")
        event.set()
        return pb.AbortResponse(success=True, message="aborted")

    # --- generation ------------------------------------------------------------------------

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.engine.stats.grpc_peers.add(context.peer())
        if self.recent is not None:
            body = MessageToJson(request, preserving_proto_field_name=True)
            self.recent.append({"path": "grpc:Generate", "headers": {}, "body": body})
        await self._faults(context)
        params = request.sampling_params
        prompt = [str(i) for i in request.tokenized.input_ids]
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input_ids is empty")
        limit = params.max_new_tokens if params.HasField("max_new_tokens") else 16
        aborted = self.active.setdefault(request.request_id, asyncio.Event())
        try:
            for index in range(max(1, params.n)):
                generation = Generation(prompt, limit)
                async for response in self._one(request, generation, index, aborted):
                    yield response
        finally:
            self.active.pop(request.request_id, None)

    async def _one(
        self, request: Any, generation: Generation, index: int, aborted: asyncio.Event
    ) -> AsyncIterator[Any]:
        params = request.sampling_params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_token_ids())
        sequence = _Sequence(self.engine, generation, self.config.faults.scripted_reply)
        output: list[int] = []
        finish, matched = "length", None
        async for _ in self.engine.run(generation):
            if aborted.is_set():
                finish = "abort"
                break
            token = sequence.next_id()
            output.append(token)
            if request.stream:
                yield self._chunk(request, generation, output, [token], index)
            if token in stops:
                finish, matched = "stop", token
                break
        yield pb.GenerateResponse(
            request_id=request.request_id,
            complete=pb.GenerateComplete(
                output_ids=[] if request.stream else output,
                finish_reason=finish,
                prompt_tokens=len(generation.prompt_tokens),
                completion_tokens=len(output),
                cached_tokens=generation.cached_tokens,
                index=index,
                **({"matched_token_id": matched} if matched is not None else {}),
            ),
        )

    def _chunk(
        self, request: Any, generation: Generation, output: list[int], ids: list[int], index: int
    ) -> Any:
        return pb.GenerateResponse(
            request_id=request.request_id,
            chunk=pb.GenerateStreamChunk(
                token_ids=ids,
                prompt_tokens=len(generation.prompt_tokens),
                completion_tokens=len(output),
                cached_tokens=generation.cached_tokens,
                index=index,
            ),
        )

    async def _faults(self, context: Any) -> None:
        faults = self.config.faults
        if faults.extra_latency_ms > 0:
            await asyncio.sleep(faults.extra_latency_ms / 1000)
        if faults.hang:
            await asyncio.Event().wait()
        if faults.error_rate > 0 and random.random() < faults.error_rate:
            code = _STATUS_FOR.get(faults.error_status, grpc.StatusCode.INTERNAL)
            await context.abort(code, "injected fault")


async def serve_grpc(
    config: SimConfig, engine: Engine, port: int, recent: deque[dict[str, Any]] | None = None
) -> grpc.aio.Server:
    """Start the scheduler service on ``config.host:port``; the caller stops it."""
    server = grpc.aio.server()
    servicer = SchedulerServicer(config, engine, recent)
    sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
    server.add_insecure_port(f"{config.host}:{port}")
    await server.start()
    sim_tokenizer()  # trained now, not on the first request
    log.info("sim gRPC scheduler on %s:%d", config.host, port)
    return server
