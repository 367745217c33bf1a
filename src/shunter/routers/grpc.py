"""One attempt of an inference request on a gRPC worker (SGLang's scheduler service).

The regular router selects the worker and runs the retry loop for both kinds of worker; for
a gRPC worker it hands the attempt here. The gateway does what the worker's HTTP server
would: chat template, tokenization, ``Generate``, incremental detokenization, stop strings,
the parsers, and OpenAI- or SGLang-shaped responses and SSE chunks. A client that leaves
cancels the call and sends ``Abort``, as does a stop string the gateway finds first.

Reliability is the HTTP path's: the worker's load is counted by the caller, a failure
before the first byte reaches the client asks for a retry, and the attempts reach the
breakers through the request's ``Verdict`` (core/verdict.py), settled before the first byte.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from shunter.aio.once import OnceCell
from shunter.asgi import (
    JSON_CONTENT,
    SSE_CONTENT,
    DisconnectWatch,
    Send,
    end_stream,
    send_bytes,
    send_chunk,
    start_stream,
)
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.protocols.errors import ApiError, stream_broken_event, upstream_failure
from shunter.protocols.generation import (
    CHAT,
    GENERATE,
    GenerationRequest,
    parse_generation_request,
)
from shunter.routers.grpc_output import OutputFormat, Sequence, Usage
from shunter.routing.attempt import RetryAttempt
from shunter.routing.retry import RETRYABLE_STATUSES
from shunter.routing.verdict import Verdict
from shunter.tokenizer.tokenizer import ModelTokenizer, TokenizerError
from shunter.transport.scheduler import SchedulerClient, SchedulerError, scheduler_error

log = logging.getLogger("shunter.router.grpc")

_SSE = [SSE_CONTENT, (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


class Tokenizers:
    """One tokenizer per model, loaded once: from a directory given at start, or from the
    first worker of the model that is asked (``GetTokenizer``)."""

    def __init__(self, path: str | None, chat_template: str | None, timeout: float) -> None:
        self.path = path
        self.chat_template = chat_template
        self.timeout = timeout
        self._cells: dict[str, OnceCell[ModelTokenizer]] = {}

    async def get(self, model: str, client: SchedulerClient) -> ModelTokenizer:
        cell = self._cells.get(model)
        if cell is None:
            cell = self._cells.setdefault(model, OnceCell(lambda: self._load(client)))
        if cell.value is not None:
            return cell.value
        try:
            return await cell.get()
        except (SchedulerError, TokenizerError):
            if self._cells.get(model) is cell:  # the next request starts afresh, maybe
                del self._cells[model]  # through another worker
            raise

    async def _load(self, client: SchedulerClient) -> ModelTokenizer:
        if self.path is not None:
            return await asyncio.to_thread(
                ModelTokenizer.from_directory, self.path, self.chat_template
            )
        files = await client.tokenizer_files(self.timeout)
        return await asyncio.to_thread(ModelTokenizer.from_files, files, self.chat_template)


class GrpcAttempt:
    """Serves attempts on gRPC workers for the regular router."""

    def __init__(
        self,
        metrics: Metrics,
        tokenizers: Tokenizers,
        request_timeout: float,
        reasoning_parser: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.request_timeout = request_timeout
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self._aborts: set[asyncio.Task[None]] = set()

    async def serve(
        self,
        worker: Worker,
        model: str,
        path: str,
        body: bytes,
        request_id: str,
        send: Send,
        watch: DisconnectWatch | None,
        last: bool,
        verdict: Verdict,
    ) -> int:
        request = parse_generation_request(path, body)
        cell = worker.scheduler_cell
        assert cell is not None
        try:
            client = cell.value or await cell.get()
            tokenizer = await self.tokenizers.get(model, client)
        except SchedulerError as exc:
            raise self._failure(worker, exc, last, verdict) from None
        except TokenizerError as exc:
            log.warning("tokenizer unavailable", extra={"model": model, "error": str(exc)})
            raise ApiError(
                500, "tokenizer_unavailable", f"the tokenizer of model {model} is not available"
            ) from None
        generate = self._generate_request(request, tokenizer, worker, request_id)
        call: Any = client.generate(generate, self.request_timeout)
        output = _Output(self, worker, request, tokenizer, request_id, model, verdict)
        try:
            status = await output.run(call, send, watch is not None)
        except asyncio.CancelledError:
            call.cancel()
            self._abort(client, request_id, "client disconnected")
            raise
        except SchedulerError as exc:
            raise self._failure(worker, exc, last, verdict) from None
        finally:
            if output.stopped_early:
                call.cancel()
                self._abort(client, request_id, "stopped by the gateway")
        self.metrics.upstream_answer(status)
        return status

    def _generate_request(
        self, request: GenerationRequest, tokenizer: ModelTokenizer, worker: Worker, rid: str
    ) -> Any:
        try:
            if request.kind == CHAT:
                assert request.messages is not None
                text = tokenizer.apply_chat_template(
                    request.messages, request.tools, request.template_kwargs
                )
                ids = tokenizer.encode(text, add_special_tokens=False)
            elif request.input_ids is not None:
                text, ids = "", request.input_ids
            else:
                text = request.text or ""
                ids = tokenizer.encode(text)
        except TokenizerError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        if not ids:
            raise ApiError(400, "invalid_request", "the prompt is empty")
        params = pb.SamplingParams(**request.sampling.as_proto_fields())
        extra = {} if worker.dp_rank is None else {"data_parallel_rank": worker.dp_rank}
        # A whole response needs one message from the worker, unless stop strings are to be
        # caught as they appear (the gateway stops the worker early then).
        stream = request.stream or bool(request.sampling.stop)
        return pb.GenerateRequest(
            request_id=rid, tokenized=pb.TokenizedInput(original_text=text, input_ids=ids),
            sampling_params=params, stream=stream, **extra,
        )  # fmt: skip

    def _failure(
        self, worker: Worker, exc: SchedulerError, last: bool, verdict: Verdict
    ) -> Exception:
        """Record a failed call; a retryable one asks for another attempt if one is left.

        A gRPC status is the worker's answer (INTERNAL is its 500, INVALID_ARGUMENT its
        400); no channel or a deadline passed is no answer at all."""
        self.metrics.worker_error(worker, "upstream_" + exc.kind)
        self.metrics.upstream_answer(exc.status, "upstream_" + exc.kind)
        if exc.kind in ("connect", "timeout"):
            verdict.unreachable(worker)
        else:
            verdict.answered(worker, exc.status)
        if exc.kind == "connect" and worker.scheduler_cell is not None:
            client = worker.scheduler_cell.value
            if client is not None:
                worker.scheduler_cell.replace(client)
        log.warning("gRPC worker call failed", extra={"worker": worker.url, "error": str(exc)})
        if (exc.kind == "connect" or exc.status in RETRYABLE_STATUSES) and not last:
            return RetryAttempt()
        code = {502: "upstream_unavailable", 504: "upstream_timeout"}.get(
            exc.status, "upstream_error"
        )
        # A 4xx is the worker's verdict on this request, worth passing on as an HTTP worker's
        # body is; a 5xx describes the worker, which the client is not told about.
        message = str(exc) if exc.status < 500 else upstream_failure(exc.kind)
        return ApiError(exc.status, code, message)

    def _abort(self, client: SchedulerClient, request_id: str, reason: str) -> None:
        async def abort() -> None:
            try:
                await client.abort(request_id, reason)
            except SchedulerError as exc:  # the worker will end the call when it notices
                log.info("abort not delivered", extra={"request_id": request_id, "error": str(exc)})

        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)


class _Output:
    """Turns one Generate call into the client's response."""

    def __init__(
        self,
        owner: GrpcAttempt,
        worker: Worker,
        request: GenerationRequest,
        tokenizer: ModelTokenizer,
        request_id: str,
        model: str,
        verdict: Verdict,
    ) -> None:
        sampling = request.sampling
        stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(tokenizer.eos_ids)
        )
        reasoning = worker.labels.get("reasoning_parser") or owner.reasoning_parser
        tools = worker.labels.get("tool_parser") or owner.tool_call_parser
        self.owner = owner
        self.worker = worker
        self.request = request
        self.sequences = [
            Sequence(i, tokenizer, request, stop_ids, reasoning, tools) for i in range(sampling.n)
        ]
        self.usage = Usage()
        self.format = OutputFormat(request, request_id, request.model or model)
        self.request_id = request_id
        self.verdict = verdict
        self.stopped_early = False

    async def run(self, call: Any, send: Send, stream: bool) -> int:
        started = False
        try:
            async for response in call:
                if stream and not started:
                    await self._start_stream(send)
                    started = True
                if await self._on_response(response, send if stream else None):
                    break
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            failure = _call_failure(exc)
            if not started:
                raise failure from None
            log.warning(
                "gRPC stream broke", extra={"worker": self.worker.url, "error": str(failure)}
            )
            Verdict.stream_broke(self.worker)
            await send_chunk(send, stream_broken_event(failure.kind))
            await end_stream(send)
            return 200
        # Finished by the gateway (a stop string) before the worker's end: stop the worker.
        self.stopped_early = not all(s.completed for s in self.sequences)
        if not stream:
            whole = self.format.whole(self.sequences, self.usage)
            self._answered()
            await send_bytes(send, 200, whole, [JSON_CONTENT])
            return 200
        if not started:
            await self._start_stream(send)
        if self.request.include_usage and self.request.kind != GENERATE:
            await send_chunk(send, self.format.usage_chunk(self.usage))
        await send_chunk(send, _DONE)
        await end_stream(send)
        return 200

    def _answered(self) -> None:
        """The answer goes to the client now: no more retries, the breakers hear it."""
        self.verdict.relayed(self.worker, 200, self.request_id)

    async def _start_stream(self, send: Send) -> None:
        self._answered()
        await start_stream(send, 200, _SSE)
        for sequence in self.sequences:
            chunk = self.format.role_chunk(sequence.index)
            if chunk is not None:
                await send_chunk(send, chunk)

    async def _on_response(self, response: Any, send: Send | None) -> bool:
        """Handle one message; True once every sequence is finished."""
        which = response.WhichOneof("response")
        if which == "chunk":
            part = response.chunk
            sequence = self._sequence(part.index)
            self._count(sequence, part)
            delta = sequence.add(list(part.token_ids))
        elif which == "complete":
            part = response.complete
            sequence = self._sequence(part.index)
            self._count(sequence, part)
            if part.output_ids and send is not None:  # ids a non-streaming worker sends here
                await self._send_delta(send, sequence, sequence.add(list(part.output_ids)))
            elif part.output_ids:
                sequence.add(list(part.output_ids))
            matched = part.WhichOneof("matched_stop")
            reason = "stop" if part.finish_reason == "stop" else part.finish_reason or "stop"
            delta = sequence.finish(reason, getattr(part, matched) if matched else None)
        else:
            return False
        if send is not None:
            await self._send_delta(send, sequence, delta)
        return all(s.done for s in self.sequences)

    async def _send_delta(self, send: Send, sequence: Sequence, delta: Any) -> None:
        if self.request.kind == GENERATE:
            if delta or sequence.done:
                await send_chunk(send, self.format.generate_state(sequence, self.usage))
            return
        chunk = self.format.delta_chunk(sequence, delta)
        if chunk is not None:
            await send_chunk(send, chunk)
        if sequence.done:
            finish = self.format.finish_chunk(sequence)
            if finish is not None:
                await send_chunk(send, finish)

    def _sequence(self, index: int) -> Sequence:
        if not 0 <= index < len(self.sequences):
            raise SchedulerError(
                f"the worker sent output index {index} for n={len(self.sequences)}"
            )
        return self.sequences[index]

    def _count(self, sequence: Sequence, part: Any) -> None:
        sequence.completion_tokens = max(sequence.completion_tokens, part.completion_tokens)
        self.usage.prompt_tokens = part.prompt_tokens or self.usage.prompt_tokens
        self.usage.cached_tokens = part.cached_tokens or self.usage.cached_tokens
        self.usage.completion_tokens = sum(s.completion_tokens for s in self.sequences)


def _call_failure(exc: BaseException) -> SchedulerError:
    """A failed call as a SchedulerError. A CancelledError is re-raised when it is this
    task being cancelled (the client left); otherwise grpc cancelled the call itself (its
    channel was closed under it), which is a failure like a lost connection."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise exc
        return SchedulerError("the call was cancelled: its channel closed", "connect")
    assert isinstance(exc, grpc.RpcError)
    return scheduler_error(exc)
