"""Operations each engine offers in its own way: flushing its prefix cache, a generation check.

- SGLang: ``POST /flush_cache`` and ``GET /health_generate``.
- llama.cpp: its prefix cache lives in its slots; ``GET /slots`` lists them and
  ``POST /slots/{id}?action=erase`` empties one (the server needs ``--slot-save-path`` for
  slot actions, else it answers 501 and the flush is reported as failed with that reason).
- vLLM: ``POST /reset_prefix_cache`` (served when vLLM runs with ``VLLM_SERVER_DEV_MODE=1``).
- A generic OpenAI-compatible server has no way to flush; it is left out of a flush.

A generation check on an engine without ``/health_generate`` asks for one token from
``/v1/completions``: the closest thing to what SGLang's endpoint does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson

from shunter.fleet.worker import Runtime, Worker
from shunter.transport.base import FullResponse, UpstreamClient, UpstreamError

if TYPE_CHECKING:
    from shunter.transport.scheduler import SchedulerClient


class EngineOpError(Exception):
    """An engine operation failed; the message says how, for the admin's response."""


def can_flush(worker: Worker) -> bool:
    return worker.runtime is not Runtime.OPENAI


async def _call(
    client: UpstreamClient, method: str, worker: Worker, path: str, body: bytes | None
) -> bytes:
    headers = worker.auth_headers()
    if body is not None:
        headers.append(("content-type", "application/json"))
    try:
        response = await client.request(method, worker.base_url + path, headers, body)
    except UpstreamError as exc:
        raise EngineOpError(str(exc)) from None
    if not 200 <= response.status < 300:
        raise EngineOpError(f"{method} {path}: status {response.status}: {_snippet(response)}")
    return response.body


async def flush(client: UpstreamClient, worker: Worker) -> None:
    """Empty the worker's prefix cache, in its engine's way; raises EngineOpError."""
    if worker.scheduler_cell is not None:
        await _scheduler_check(worker, "FlushCache", lambda s: s.flush_cache(5.0))
    elif worker.runtime is Runtime.SGLANG:
        await _call(client, "POST", worker, "/flush_cache", b"")
    elif worker.runtime is Runtime.VLLM:
        await _call(client, "POST", worker, "/reset_prefix_cache", b"")
    elif worker.runtime is Runtime.LLAMACPP:
        await _erase_slots(client, worker)
    else:
        raise EngineOpError(f"a {worker.runtime.value} server has no way to flush its cache")


async def _erase_slots(client: UpstreamClient, worker: Worker) -> None:
    try:
        slots = orjson.loads(await _call(client, "GET", worker, "/slots", None))
        ids = [int(slot["id"]) for slot in slots]
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise EngineOpError("GET /slots did not answer a list of slots") from None
    await asyncio.gather(
        *(_call(client, "POST", worker, f"/slots/{i}?action=erase", b"") for i in ids)
    )


async def _scheduler_check(
    worker: Worker, what: str, call: Callable[[SchedulerClient], Awaitable[tuple[bool, str]]]
) -> None:
    """Run one (ok, message) RPC on a gRPC worker; EngineOpError unless it says ok."""
    from shunter.transport.scheduler import SchedulerError

    cell = worker.scheduler_cell
    assert cell is not None
    try:
        ok, message = await call(cell.value or await cell.get())
    except SchedulerError as exc:
        raise EngineOpError(str(exc)) from None
    if not ok:
        raise EngineOpError(f"{what}: {message}")


async def health_generate(client: UpstreamClient | None, worker: Worker) -> bytes:
    """Run a generation check on ``worker``; its body on success, else EngineOpError.

    A gRPC worker's ``HealthCheck`` is the scheduler's own generation check."""
    if worker.scheduler_cell is not None:
        await _scheduler_check(worker, "HealthCheck", lambda s: s.health_check(30.0))
        return b""
    assert client is not None
    if worker.runtime is Runtime.SGLANG:
        return await _call(client, "GET", worker, "/health_generate", None)
    body = orjson.dumps({"model": worker.model_id, "prompt": "ping", "max_tokens": 1})
    await _call(client, "POST", worker, "/v1/completions", body)
    return b""


def _snippet(response: FullResponse) -> str:
    return response.body[:200].decode("utf-8", "replace")
