"""One inference request on a gRPC worker (SGLang's scheduler service), as a ``Reply``.

The gateway does what the worker's HTTP server would: chat template, tokenization,
``Generate``, incremental detokenization, stop strings, the reasoning and tool-call parsers,
and OpenAI- or SGLang-shaped responses and SSE chunks.

What the router sees is what an HTTP worker gives it. A worker that cannot be reached (no
channel, a deadline passed) is an ``UpstreamError``; a gRPC error status is the worker's
answer, turned into the status an HTTP worker would have sent (INVALID_ARGUMENT is its
400, RESOURCE_EXHAUSTED its 429, INTERNAL and the rest its 5xx). A stream's reply is
returned once the first message has arrived, so a failure before it can still be retried
elsewhere; a failure after it ends the stream with an ``UpstreamError``.

A client that leaves closes the reply (or cancels ``send``): the call is cancelled and the
worker is sent ``Abort``, as it is when a stop string the gateway finds ends the output
before the worker would have.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from shunter.backends.base import Outbound, Target
from shunter.backends.grpc.messages import MessagesFormat
from shunter.backends.grpc.output import OutputFormat, OutputSequence, Usage
from shunter.backends.grpc.scheduler import SchedulerClient, SchedulerError, scheduler_error
from shunter.backends.grpc.tokenizers import Tokenizers
from shunter.protocols.anthropic import (
    MESSAGES_PATH,
    anthropic_error_reply,
    parse_messages_request,
)
from shunter.protocols.bootstrap import SGLANG_DEFAULT_BOOTSTRAP_PORT, Bootstrap
from shunter.protocols.errors import ApiError, error_reply, upstream_failure
from shunter.protocols.generation import (
    CHAT,
    GENERATE,
    MESSAGES,
    GenerationRequest,
    parse_generation_request,
)
from shunter.protocols.reply import JSON_CONTENT, SSE_CONTENT, Chunks, Reply, primed
from shunter.protocols.tokenize import (
    TOKEN_PATHS,
    TOKENIZE_PATH,
    detokenize_answer,
    parse_detokenize,
    parse_tokenize,
    tokenize_answer,
)
from shunter.tokenizer.tokenizer import ModelTokenizer, TokenizerError
from shunter.wire.base import UpstreamError

log = logging.getLogger("shunter.backends.grpc")

# What a gRPC worker serves: the gateway tokenizes and formats these for it (and answers
# tokenize and detokenize itself, with the tokenizer it loaded from the worker).
GRPC_PATHS = (
    frozenset({"/generate", "/v1/chat/completions", "/v1/completions", MESSAGES_PATH}) | TOKEN_PATHS
)
MODEL_INFO_SECS = 5.0
SSE_HEADERS = [SSE_CONTENT, (b"cache-control", b"no-cache")]
_ERROR_CODES = {400: "invalid_request", 429: "rate_limit_exceeded"}


class GrpcPipeline:
    """Shared by every gRPC worker: tokenizers (one per model), default parsers, timeout."""

    def __init__(
        self,
        tokenizers: Tokenizers,
        request_timeout: float,
        reasoning_parser: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.tokenizers = tokenizers
        self.request_timeout = request_timeout
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self._aborts: set[asyncio.Task[None]] = set()
        self._context_lengths: dict[str, int] = {}  # per model, from GetModelInfo

    async def send(self, client: SchedulerClient, target: Target, request: Outbound) -> Reply:
        if request.path in TOKEN_PATHS:
            return await self._tokens(client, request)
        if request.path == MESSAGES_PATH:
            generation = parse_messages_request(request.body)
        else:
            generation = parse_generation_request(request.path, request.body)
        try:
            tokenizer = await self.tokenizers.get(request.model, client)
            generate = self._generate_request(generation, tokenizer, target, request)
            call: Any = client.generate(generate, self.request_timeout)
        except SchedulerError as exc:
            return _answer(exc, request.path)
        except TokenizerError as exc:
            raise _no_tokenizer(request.model, exc) from None
        output = _Output(self, target, generation, tokenizer, request, client, call)
        try:
            if generation.stream:
                first = await output.first_message()
                return Reply(200, list(SSE_HEADERS), await primed(output.stream(first)))
            return Reply(200, [JSON_CONTENT], await output.whole())
        except SchedulerError as exc:
            output.stop("the request failed")
            return _answer(exc, request.path)
        except BaseException:
            output.stop("client disconnected")
            raise

    async def _tokens(self, client: SchedulerClient, request: Outbound) -> Reply:
        """/v1/tokenize or /v1/detokenize, answered with the gateway's tokenizer."""
        try:
            tokenizer = await self.tokenizers.get(request.model, client)
            if request.path != TOKENIZE_PATH:
                answer = detokenize_answer(parse_detokenize(request.body), tokenizer.decode)
                return Reply(200, [JSON_CONTENT], answer)
            limit = self._context_lengths.get(request.model)
            if limit is None:
                info = await client.model_info(MODEL_INFO_SECS)
                limit = self._context_lengths[request.model] = int(info.max_context_length)
        except SchedulerError as exc:
            return _answer(exc, request.path)
        except TokenizerError as exc:
            raise _no_tokenizer(request.model, exc) from None
        answer = tokenize_answer(parse_tokenize(request.body), tokenizer.encode, limit)
        return Reply(200, [JSON_CONTENT], answer)

    def _generate_request(
        self,
        request: GenerationRequest,
        tokenizer: ModelTokenizer,
        target: Target,
        outbound: Outbound,
    ) -> Any:
        try:
            if request.kind in (CHAT, MESSAGES):
                assert request.messages is not None
                text = tokenizer.apply_chat_template(
                    request.messages, request.tools, request.template_kwargs
                )
                ids = tokenizer.encode_prompt(text)
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
        extra: dict[str, Any] = {}
        if target.dp_rank is not None:
            extra["data_parallel_rank"] = target.dp_rank
        if outbound.bootstrap is not None:
            extra["disaggregated_params"] = _disaggregated(outbound.bootstrap)
        # A whole response needs one message from the worker, unless stop strings are to be
        # caught as they appear (the gateway stops the worker early then).
        stream = request.stream or bool(request.sampling.stop)
        return pb.GenerateRequest(
            request_id=outbound.request_id,
            tokenized=pb.TokenizedInput(original_text=text, input_ids=ids),
            sampling_params=params,
            stream=stream,
            **extra,
        )

    def abort(self, client: SchedulerClient, request_id: str, reason: str) -> None:
        """Tell the worker to drop the request, in the background."""

        async def abort() -> None:
            try:
                await client.abort(request_id, reason)
            except SchedulerError as exc:  # the worker ends the call when it notices
                log.info("abort not delivered", extra={"request_id": request_id, "error": str(exc)})

        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)


def _no_tokenizer(model: str, exc: TokenizerError) -> ApiError:
    log.warning("tokenizer unavailable", extra={"model": model, "error": str(exc)})
    message = f"the tokenizer of model {model} is not available"
    return ApiError(500, "tokenizer_unavailable", message)


def _disaggregated(bootstrap: Bootstrap) -> Any:
    """The proto's bootstrap fields: one room (a gRPC request is one prompt), the port
    SGLang's engines default to when the prefill worker's is not known."""
    return pb.DisaggregatedParams(
        bootstrap_host=bootstrap.host,
        bootstrap_port=bootstrap.port or SGLANG_DEFAULT_BOOTSTRAP_PORT,
        bootstrap_room=bootstrap.rooms[0],
    )


def _answer(exc: SchedulerError, path: str) -> Reply:
    """A failed call: no answer at all raises; a gRPC status is the worker's answer, in the
    endpoint's error envelope."""
    if exc.kind in ("connect", "timeout"):
        raise UpstreamError(exc.kind, str(exc)) from None
    # A 4xx is the worker's verdict on this request, worth passing on as an HTTP worker's
    # body is; a 5xx describes the worker, which the client is not told about.
    message = str(exc) if exc.status < 500 else upstream_failure(exc.kind)
    error = ApiError(exc.status, _ERROR_CODES.get(exc.status, "upstream_error"), message)
    return anthropic_error_reply(error) if path == MESSAGES_PATH else error_reply(error)


class _Output:
    """Turns one Generate call into the client's response."""

    def __init__(
        self,
        pipeline: GrpcPipeline,
        target: Target,
        generation: GenerationRequest,
        tokenizer: ModelTokenizer,
        request: Outbound,
        client: SchedulerClient,
        call: Any,
    ) -> None:
        sampling = generation.sampling
        stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(tokenizer.eos_ids)
        )
        reasoning = target.labels.get("reasoning_parser") or pipeline.reasoning_parser
        tools = target.labels.get("tool_parser") or pipeline.tool_call_parser
        self.pipeline = pipeline
        self.generation = generation
        self.client = client
        self.call = call
        self.request_id = request.request_id
        self.sequences = [
            OutputSequence(i, tokenizer, generation, stop_ids, reasoning, tools)
            for i in range(sampling.n)
        ]
        self.usage = Usage()
        model = generation.model or request.model
        self.format: OutputFormat | MessagesFormat = (
            MessagesFormat(generation, request.request_id, model, self.usage)
            if generation.kind == MESSAGES
            else OutputFormat(generation, request.request_id, model)
        )
        self._messages: AsyncIterator[Any] = call.__aiter__()
        self.ended = False  # the worker finished every sequence, or the gateway stopped it

    # --- reading the call --------------------------------------------------------------------

    async def _next(self) -> Any | None:
        """The next message, or None at the call's end; SchedulerError if it failed."""
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            return None
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            raise _call_failure(exc) from None

    async def first_message(self) -> Any | None:
        return await self._next()

    def stop(self, reason: str) -> None:
        """End the worker's side unless it already ended: cancel the call, send Abort."""
        if not self.ended:
            self.ended = True
            self.call.cancel()
            self.pipeline.abort(self.client, self.request_id, reason)

    def _finished(self) -> None:
        """No more output wanted: stop the worker if a stop string ended it first."""
        if all(s.completed for s in self.sequences):
            self.ended = True
        else:
            self.stop("stopped by the gateway")

    # --- whole -------------------------------------------------------------------------------

    async def whole(self) -> bytes:
        while (message := await self._next()) is not None:
            if self._on_message(message, None):
                break
        self._finished()
        return self.format.whole(self.sequences, self.usage)

    # --- streamed ----------------------------------------------------------------------------

    async def stream(self, first: Any | None) -> Chunks:
        try:
            yield b""  # primed: see protocols/reply.py
            for sequence in self.sequences:
                chunk = self.format.role_chunk(sequence.index)
                if chunk is not None:
                    yield chunk
            message = first
            while message is not None:
                chunks: list[bytes] = []
                try:
                    done = self._on_message(message, chunks)
                except SchedulerError as exc:
                    raise self._broke(exc) from None
                for chunk in chunks:
                    yield chunk
                if done:
                    break
                try:
                    message = await self._next()
                except SchedulerError as exc:
                    raise self._broke(exc) from None
            self._finished()
            if self.generation.include_usage and self.generation.kind != GENERATE:
                yield self.format.usage_chunk(self.usage)
            if self.format.done is not None:
                yield self.format.done
        finally:
            self.stop("the response ended early")  # only if not ended: the client left

    def _broke(self, exc: SchedulerError) -> UpstreamError:
        log.warning("gRPC stream broke", extra={"request_id": self.request_id, "error": str(exc)})
        return UpstreamError(exc.kind, str(exc))

    # --- one message -------------------------------------------------------------------------

    def _on_message(self, message: Any, chunks: list[bytes] | None) -> bool:
        """Handle one message (into ``chunks`` when streaming); True once all are done."""
        which = message.WhichOneof("response")
        if which == "chunk":
            part = message.chunk
            sequence = self._sequence(part.index)
            self._count(sequence, part)
            delta = sequence.add(list(part.token_ids))
        elif which == "complete":
            part = message.complete
            sequence = self._sequence(part.index)
            self._count(sequence, part)
            unseen = _unseen_ids(part, sequence)
            if unseen:
                added = sequence.add(unseen)
                if chunks is not None:
                    self._deltas(chunks, sequence, added)
            matched = part.WhichOneof("matched_stop")
            reason = "stop" if part.finish_reason == "stop" else part.finish_reason or "stop"
            delta = sequence.finish(reason, getattr(part, matched) if matched else None)
        else:
            return False
        if chunks is not None:
            self._deltas(chunks, sequence, delta)
        return all(s.done for s in self.sequences)

    def _deltas(self, chunks: list[bytes], sequence: OutputSequence, delta: Any) -> None:
        if self.generation.kind == GENERATE:
            if delta or sequence.done:
                chunks.append(self.format.generate_state(sequence, self.usage))
            return
        chunk = self.format.delta_chunk(sequence, delta)
        if chunk is not None:
            chunks.append(chunk)
        if sequence.done:
            finish = self.format.finish_chunk(sequence)
            if finish is not None:
                chunks.append(finish)

    def _sequence(self, index: int) -> OutputSequence:
        if not 0 <= index < len(self.sequences):
            raise SchedulerError(
                f"the worker sent output index {index} for n={len(self.sequences)}"
            )
        return self.sequences[index]

    def _count(self, sequence: OutputSequence, part: Any) -> None:
        sequence.completion_tokens = max(sequence.completion_tokens, part.completion_tokens)
        self.usage.prompt_tokens = part.prompt_tokens or self.usage.prompt_tokens
        self.usage.cached_tokens = part.cached_tokens or self.usage.cached_tokens
        self.usage.completion_tokens = sum(s.completion_tokens for s in self.sequences)


def _unseen_ids(complete: Any, sequence: OutputSequence) -> list[int]:
    """The ids of a ``complete`` that its chunks did not bring. Whole, it carries them all;
    streamed, SGLang's servicer repeats there the ids of the last chunk (it sends the
    finishing step both ways), where an older one sent the last step's ids only there. The
    count of completion tokens tells which: the ids past those received are new."""
    ids = complete.output_ids
    if not ids:
        return []
    if not complete.completion_tokens:
        return list(ids)
    unseen = complete.completion_tokens - len(sequence.output_ids)
    return list(ids[-unseen:]) if unseen > 0 else []


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
