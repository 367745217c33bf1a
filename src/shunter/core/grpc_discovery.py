"""Reaching and describing a gRPC worker: ``HealthCheck``, ``GetModelInfo``, ``GetServerInfo``.

Used by the registrar for ``grpc://`` URLs, and for URLs given without a scheme, which are
probed as HTTP and as gRPC at once (smg does the same, inventory §6.5): the first protocol
the worker answers decides its connection mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shunter.aio.once import OnceCell


@dataclass
class GrpcDiscovery:
    model: str
    labels: dict[str, str] = field(default_factory=dict)


async def health_problem(cell: OnceCell[Any], probe_timeout: float) -> str | None:
    """What ``HealthCheck`` says is wrong with the worker, or None when it is healthy."""
    from shunter.transport.scheduler import SchedulerError

    try:
        client = cell.value or await cell.get()
        healthy, message = await client.health_check(probe_timeout)
    except SchedulerError as exc:
        return str(exc)
    return None if healthy else f"unhealthy: {message}"


async def describe(cell: OnceCell[Any], probe_timeout: float) -> GrpcDiscovery:
    """The worker's model and labels from its model and server info."""
    client = cell.value or await cell.get()
    info = await client.model_info(probe_timeout)
    model = info.served_model_name or info.model_path or "unknown"
    labels = {"model_path": info.model_path or model}
    if info.model_type:
        labels["model_type"] = info.model_type
    if info.architectures:
        labels["architectures"] = ",".join(info.architectures)
    if info.tokenizer_path:
        labels["tokenizer_path"] = info.tokenizer_path
    server = await client.server_info(probe_timeout)
    if server.sglang_version:
        labels["sglang_version"] = server.sglang_version
    return GrpcDiscovery(model, labels)


async def first_to_answer(
    http: Callable[[], Awaitable[None]], grpc: Callable[[], Awaitable[None]]
) -> str:
    """Run both probes; "http" or "grpc" for the first to succeed. If both fail, raise the
    HTTP probe's error (the usual case for a URL without a scheme)."""
    tasks = {
        asyncio.ensure_future(http()): "http",
        asyncio.ensure_future(grpc()): "grpc",
    }
    errors: dict[str, BaseException] = {}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    return tasks[task]
                errors[tasks[task]] = error
        raise errors["http"]
    finally:
        for task in tasks:
            task.cancel()
