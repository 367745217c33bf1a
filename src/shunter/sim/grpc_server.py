"""`shunter sim --grpc`: the simulated worker speaking SGLang's gRPC scheduler service.

The same engine as the HTTP sim (slots with a queue, prefill cost per uncached token, the
prefix cache, faults), fed with token ids. Output: the engine's deterministic words, encoded
with the sim's own tokenizer (``sim/tokenizer.py``) and sent one token id per step, so
``max_new_tokens`` counts ids as a real engine does. ``GetTokenizer`` hands that tokenizer
to the gateway.

In PD (``--disaggregation-mode``) a request's ``disaggregated_params`` join its legs as the
HTTP fields do (``pd.py``): a prefill prefills, publishes the room at its (HTTP) bootstrap
server, holds until the decode claimed it, then completes with its one token; a decode
claims the room, then generates. A bootstrap timeout ends the call with INTERNAL, which the
gateway sees as a worker failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2, sglang_scheduler_pb2_grpc

from shunter.sim.bootstrap import BootstrapTimeout
from shunter.sim.config import SimConfig
from shunter.sim.engine import Engine, Generation
from shunter.sim.logprobs import logprob, start_position
from shunter.sim.pd import Disaggregation
from shunter.sim.rooms import RoomInUse
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


def _input_logprobs(input_ids: list[int], logprob_start_len: int) -> Any:
    """The prompt's logprobs, as a prefill returns them (the values of ``sim/logprobs.py``)."""
    start = start_position(logprob_start_len, len(input_ids))
    positions = range(start, len(input_ids))
    return pb.InputLogProbs(
        token_logprobs=[pb.InputTokenLogProb(value=logprob(input_ids[i], i)) for i in positions],
        token_ids=[input_ids[i] for i in positions],
    )


def _stream_interval(params: Any) -> int:
    """Tokens per streamed chunk: the request's ``stream_interval``, else SGLang's default
    (``--stream-interval 1``)."""
    if params.HasField("stream_interval") and params.stream_interval > 1:
        return int(params.stream_interval)
    return 1


def _chunk_due(generated: int, interval: int) -> bool:
    """Whether SGLang's scheduler streams after its ``generated``-th token: the first at
    once, then every ``interval`` (and the last, which the caller knows)."""
    return interval == 1 or generated % interval == 1


async def _unless_aborted(work: Coroutine[Any, Any, Any], aborted: asyncio.Event) -> bool:
    """Run ``work`` unless the request is aborted first (False: it was, and ``work`` stops)."""
    task = asyncio.ensure_future(work)
    abort = asyncio.ensure_future(aborted.wait())
    try:
        await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        abort.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        task.result()  # its failure is the request's
        return True
    return False


class SchedulerServicer(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):  # type: ignore[misc]
    def __init__(
        self,
        config: SimConfig,
        engine: Engine,
        recent: deque[dict[str, Any]] | None = None,
        pd: Disaggregation | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.recent = recent  # the HTTP sim's /sim/requests log: tests read what was sent
        self.pd = pd  # this sim's PD role, when it plays one
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
        # As the HTTP sim's records: role, rooms, and whether the call was cancelled; the
        # request's id where an HTTP record has its x-request-id header.
        record: dict[str, Any] = {
            "path": "grpc:Generate",
            "headers": {"x-request-id": [request.request_id]},
            "role": self.config.disaggregation_mode,
            "rooms": [],
            "aborted": False,
        }
        if self.recent is not None:
            record["body"] = MessageToJson(request, preserving_proto_field_name=True)
            self.recent.append(record)
        await self._faults(context)
        params = request.sampling_params
        prompt = [str(i) for i in request.tokenized.input_ids]
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input_ids is empty")
        limit = params.max_new_tokens if params.HasField("max_new_tokens") else 16
        aborted = self.active.setdefault(request.request_id, asyncio.Event())
        try:
            if self.pd is not None:
                async for response in self._pd_leg(request, context, prompt, aborted, record):
                    yield response
                if self.pd.mode == "prefill" or record["aborted"]:
                    return
            for index in range(max(1, params.n)):
                generation = Generation(prompt, limit)
                async for response in self._one(request, generation, index, aborted):
                    yield response
            if aborted.is_set():
                record["aborted"] = True
        except asyncio.CancelledError:  # the client went
            record["aborted"] = True
            raise
        finally:
            self.active.pop(request.request_id, None)

    async def _pd_leg(
        self,
        request: Any,
        context: Any,
        prompt: list[str],
        aborted: asyncio.Event,
        record: dict[str, Any],
    ) -> AsyncIterator[Any]:
        """A prefill's whole answer; for a decode, the wait for its room (nothing yielded
        unless the call is aborted while it waits)."""
        assert self.pd is not None
        if not request.HasField("disaggregated_params"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.pd.mode} worker needs disaggregated_params "
                "(bootstrap_host, bootstrap_port, bootstrap_room)",
            )
        bootstrap = request.disaggregated_params
        if not bootstrap.bootstrap_host:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "disaggregated_params needs bootstrap_host"
            )
        record["rooms"] = [bootstrap.bootstrap_room]
        key = str(bootstrap.bootstrap_room)
        try:
            if self.pd.mode == "prefill":
                async for response in self._prefill(request, context, prompt, key, aborted):
                    yield response
            else:
                source = (bootstrap.bootstrap_host, bootstrap.bootstrap_port or None, key)
                started = time.monotonic()
                try:
                    claimed = await self._wait(self.pd.pull([source]), aborted)
                finally:
                    record["bootstrap_wait_ms"] = round((time.monotonic() - started) * 1000, 1)
                if not claimed:
                    yield self._aborted(request, Generation(prompt, 0))
        except BootstrapTimeout as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except RoomInUse as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if aborted.is_set():
            record["aborted"] = True

    async def _prefill(
        self, request: Any, context: Any, prompt: list[str], key: str, aborted: asyncio.Event
    ) -> AsyncIterator[Any]:
        """Prefill, publish the room, hold until it is claimed, complete with one token."""
        assert self.pd is not None
        generation = Generation(prompt, 1)
        sequence = _Sequence(self.engine, generation, self.config.faults.scripted_reply)
        token = 0
        async for _ in self.engine.run(generation):
            token = sequence.next_id()
        info = {
            "room": int(key),
            "prompt_tokens": len(prompt),
            "cached_tokens": generation.cached_tokens,
        }
        room = self.pd.publish(key, info)
        if not await self._wait(self.pd.hold([room]), aborted):
            yield self._aborted(request, generation)
            return
        logprobs = {}
        if request.return_logprob:
            ids = list(request.tokenized.input_ids)
            logprobs = {"input_logprobs": _input_logprobs(ids, request.logprob_start_len)}
        yield pb.GenerateResponse(
            request_id=request.request_id,
            complete=pb.GenerateComplete(
                output_ids=[token],
                finish_reason="length",
                prompt_tokens=len(prompt),
                completion_tokens=1,
                cached_tokens=generation.cached_tokens,
                **logprobs,
            ),
        )

    async def _wait(self, work: Coroutine[Any, Any, Any], aborted: asyncio.Event) -> bool:
        """A PD wait, outside the engine: an Abort or the client going while it waits
        counts in aborted_total here, as the engine counts one while it runs."""
        try:
            done = await _unless_aborted(work, aborted)
        except asyncio.CancelledError:
            self.engine.stats.aborted_total += 1
            raise
        if not done:
            self.engine.stats.aborted_total += 1
        return done

    @staticmethod
    def _aborted(request: Any, generation: Generation) -> Any:
        return pb.GenerateResponse(
            request_id=request.request_id,
            complete=pb.GenerateComplete(
                finish_reason="abort",
                prompt_tokens=len(generation.prompt_tokens),
                cached_tokens=generation.cached_tokens,
            ),
        )

    async def _one(
        self, request: Any, generation: Generation, index: int, aborted: asyncio.Event
    ) -> AsyncIterator[Any]:
        params = request.sampling_params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_token_ids())
        sequence = _Sequence(self.engine, generation, self.config.faults.scripted_reply)
        interval = _stream_interval(params)
        output: list[int] = []
        unsent: list[int] = []  # generated since the last chunk
        last_chunk: list[int] = []
        finish, matched = "length", None
        async for _ in self.engine.run(generation):
            if aborted.is_set():
                finish = "abort"
                break
            token = sequence.next_id()
            output.append(token)
            unsent.append(token)
            ends = token in stops or len(output) >= generation.max_tokens
            if request.stream and (ends or _chunk_due(len(output), interval)):
                yield self._chunk(request, generation, output, unsent, index)
                last_chunk, unsent = unsent, []
            if token in stops:
                finish, matched = "stop", token
                break
        # Streamed, SGLang's servicer sends the finishing step twice: as a chunk, then as
        # the complete, whose output_ids are that step's ids again; whole, the complete
        # carries every id.
        yield pb.GenerateResponse(
            request_id=request.request_id,
            complete=pb.GenerateComplete(
                output_ids=last_chunk if request.stream else output,
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
    config: SimConfig,
    engine: Engine,
    port: int,
    recent: deque[dict[str, Any]] | None = None,
    pd: Disaggregation | None = None,
) -> grpc.aio.Server:
    """Start the scheduler service on ``config.host:port``; the caller stops it."""
    server = grpc.aio.server()
    servicer = SchedulerServicer(config, engine, recent, pd)
    sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
    server.add_insecure_port(f"{config.host}:{port}")
    await server.start()
    sim_tokenizer()  # trained now, not on the first request
    log.info("sim gRPC scheduler on %s:%d", config.host, port)
    return server
