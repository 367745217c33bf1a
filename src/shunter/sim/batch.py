"""Several sequences in one response: a batch of prompts, or n > 1, as SGLang answers them.

A PD request joins its legs with one room per sequence, so a PD sim must answer each
sequence of a batch on its own: ``/generate`` with a list of texts (or of ``input_ids``
lists) answers a JSON list, streamed as one SSE stream whose events carry their item's
``index``; chat with ``n > 1`` and completions with a list ``prompt`` answer one response
whose choices are the items (``choices[i].index == i``). The items run in the engine at
once, as a real scheduler batches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from shunter.protocols.reply import JSON_CONTENT, SSE_CONTENT
from shunter.sim.disconnect import DisconnectWatch
from shunter.sim.engine import Generation
from shunter.sim.formats import SSE_DONE, Format, GenerateFormat, usage
from shunter.sim.request import DroppedConnection, Request
from shunter.sim.send import end_stream, send_bytes, send_chunk, start_stream


class BatchItem:
    """One sequence: its format (with its index), its bookkeeping, its tokens as they come."""

    __slots__ = ("fmt", "generation", "tokens")

    def __init__(self, fmt: Format, generation: Generation, tokens: AsyncIterator[str]) -> None:
        self.fmt = fmt
        self.generation = generation
        self.tokens = tokens


def share_response_id(formats: Sequence[Format]) -> None:
    """One response, one id: the items of a chat or completion batch share the first's."""
    for fmt in formats[1:]:
        fmt.id, fmt.created = formats[0].id, formats[0].created


def combined_usage(generations: Sequence[Generation], shared_prompt: bool) -> Generation:
    """The whole response's counts: a prompt sent once (n > 1) is counted once."""
    prompts = generations[:1] if shared_prompt else generations
    total = Generation([t for g in prompts for t in g.prompt_tokens], 0)
    total.cached_tokens = sum(g.cached_tokens for g in prompts)
    total.completion_tokens = sum(g.completion_tokens for g in generations)
    return total


async def _text(tokens: AsyncIterator[str]) -> str:
    return " ".join([token async for token in tokens])


async def answer_batch(
    request: Request,
    items: Sequence[BatchItem],
    stream: bool,
    shared_prompt: bool,
    drop_after_chunks: int = -1,
) -> None:
    """Answer every item in one response, whole or streamed."""
    watch = DisconnectWatch(request.receive)
    try:
        if stream:
            await _stream(request, items, shared_prompt, drop_after_chunks)
            watch.finish()  # before the end: uvicorn reports a finished response as a disconnect
            await end_stream(request.send)
        else:
            texts = await asyncio.gather(*(_text(item.tokens) for item in items))
            watch.finish()
            payload = _whole(items, texts, shared_prompt)
            headers = [JSON_CONTENT, request.worker_header]
            await send_bytes(request.send, 200, orjson.dumps(payload), headers)
    except asyncio.CancelledError:
        if watch.absorb_cancel():
            request.record["aborted"] = True
            return
        raise


def _whole(items: Sequence[BatchItem], texts: Sequence[str], shared_prompt: bool) -> Any:
    wholes = [
        item.fmt.whole(text, item.generation) for item, text in zip(items, texts, strict=True)
    ]
    if isinstance(items[0].fmt, GenerateFormat):
        return wholes
    payload = wholes[0]
    payload["choices"] = [whole["choices"][0] for whole in wholes]
    payload["usage"] = usage(combined_usage([i.generation for i in items], shared_prompt))
    return payload


async def _stream(
    request: Request, items: Sequence[BatchItem], shared_prompt: bool, drop_after: int
) -> None:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def produce(item: BatchItem) -> None:
        fmt, generation = item.fmt, item.generation
        first = fmt.first_chunk()
        text = ""
        async for token in item.tokens:
            if first is not None:
                queue.put_nowait(first)
                first = None
            text = f"{text} {token}" if text else token
            queue.put_nowait(fmt.chunk(token, text, generation))
        for chunk in fmt.finish_chunks(generation):
            queue.put_nowait(chunk)

    tasks = [asyncio.ensure_future(produce(item)) for item in items]
    for task in tasks:
        task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        await start_stream(request.send, 200, [SSE_CONTENT, request.worker_header])
        running, sent = len(tasks), 0
        while running:
            chunk = await queue.get()
            if chunk is None:
                running -= 1
                continue
            await send_chunk(request.send, chunk)
            sent += 1
            if sent == drop_after:
                raise DroppedConnection("injected fault: stream dropped")
        for task in tasks:
            task.result()  # a producer's failure is the response's
        usage_chunk = items[0].fmt.usage_chunk(
            combined_usage([i.generation for i in items], shared_prompt)
        )
        if usage_chunk is not None:
            await send_chunk(request.send, usage_chunk)
        await send_chunk(request.send, SSE_DONE)
    finally:
        for task in tasks:
            task.cancel()
