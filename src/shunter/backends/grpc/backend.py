"""A worker reached over gRPC: SGLang's scheduler service, on one channel per worker.

The channel is created on first use by one task and read as an attribute after
(``aio/once.py``). A failed health check, or a call that finds no channel, starts building
a replacement in the background; the old channel is *retired* (closed once its running
calls end, ``SchedulerClient.retire``), never cut under them. A worker restarted on the same
port is served again without being re-added.

Everything the worker's HTTP server would do for a request, the gateway does
(``pipeline.py``); the control plane maps onto the service's RPCs: ``HealthCheck`` (also
the generation check: it is the scheduler's own), ``GetLoads``, ``FlushCache``,
``GetServerInfo`` and ``GetModelInfo`` (as JSON, with the proto's field names).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.json_format import MessageToJson

from shunter.aio.once import OnceCell
from shunter.backends.base import (
    Backend,
    ConnectionMode,
    Description,
    EngineOpError,
    InfoKind,
    Load,
    Outbound,
    Runtime,
    Target,
)
from shunter.backends.grpc.pipeline import GRPC_PATHS, GrpcPipeline
from shunter.backends.grpc.scheduler import SchedulerClient, SchedulerError
from shunter.protocols.reply import JSON_CONTENT, Reply
from shunter.wire.base import UpstreamError

# The scheduler's HealthCheck generates a token; it may take longer than a probe.
GENERATION_CHECK_SECS = 30.0
CONTROL_SECS = 5.0


class GrpcBackend(Backend):
    mode = ConnectionMode.GRPC
    runtime = Runtime.SGLANG

    def __init__(self, url: str, pipeline: GrpcPipeline, retire_grace_secs: float) -> None:
        self.url = url
        self._pipeline = pipeline

        async def create() -> SchedulerClient:
            return SchedulerClient(url)

        async def close(client: SchedulerClient) -> None:
            await client.close()

        async def retire(client: SchedulerClient) -> None:
            await client.retire(retire_grace_secs)

        # The worker's channel: read as ``channel.value or await channel.get()``.
        self.channel: OnceCell[SchedulerClient] = OnceCell(create, close, retire)

    async def _client(self) -> SchedulerClient:
        cell = self.channel
        return cell.value or await cell.get()

    def _replace(self, broken: SchedulerClient | None) -> None:
        if broken is not None:
            self.channel.replace(broken)

    def serves(self, path: str) -> bool:
        return path in GRPC_PATHS

    async def send(self, target: Target, request: Outbound) -> Reply:
        channel = self.channel
        client = channel.value or await channel.get()
        try:
            return await self._pipeline.send(client, target, request)
        except UpstreamError as exc:
            if exc.kind == "connect":
                self._replace(client)
            raise

    # --- the control plane -----------------------------------------------------------------

    async def probe(self, target: Target, timeout: float) -> str | None:
        """``HealthCheck``. A failing check starts building a fresh channel in the
        background (the old one serves until it is ready): a restarted worker, or a channel
        stuck in a bad state, heals without being re-added."""
        probed = self.channel.value  # the channel this check judges (None: created by it)
        try:
            client = await self._client()
            healthy, message = await client.health_check(timeout)
        except SchedulerError as exc:
            self._replace(probed or self.channel.value)
            return str(exc)
        if healthy:
            return None
        self._replace(probed or client)
        return f"unhealthy: {message}"

    async def describe(self, timeout: float) -> Description:
        """The worker's model and labels, from its model and server info."""
        client = await self._client()
        info = await client.model_info(timeout)
        model = info.served_model_name or info.model_path or "unknown"
        labels = {"model_path": info.model_path or model}
        if info.model_type:
            labels["model_type"] = info.model_type
        if info.architectures:
            labels["architectures"] = ",".join(info.architectures)
        if info.tokenizer_path:
            labels["tokenizer_path"] = info.tokenizer_path
        server = await client.server_info(timeout)
        if server.sglang_version:
            labels["sglang_version"] = server.sglang_version
        return Description(Runtime.SGLANG, (model,), None, labels)

    async def load(self, target: Target) -> Load:
        """``GetLoads``: tokens in use (Σ over DP ranks) and the mean cache hit rate."""
        try:
            reply = await (await self._client()).loads(CONTROL_SECS)
        except SchedulerError:
            return Load()
        rates = [load.cache_hit_rate for load in reply.loads]
        hit = sum(rates) / len(rates) if rates else None
        return Load(sum(load.num_used_tokens for load in reply.loads), hit)

    async def flush(self, target: Target) -> None:
        await self._check("FlushCache", lambda client: client.flush_cache(CONTROL_SECS))

    async def health_generate(self, target: Target) -> bytes:
        await self._check("HealthCheck", lambda c: c.health_check(GENERATION_CHECK_SECS))
        return b""

    async def _check(
        self, what: str, call: Callable[[SchedulerClient], Awaitable[tuple[bool, str]]]
    ) -> None:
        """Run one (ok, message) RPC; EngineOpError unless it says ok."""
        try:
            ok, message = await call(await self._client())
        except SchedulerError as exc:
            raise EngineOpError(str(exc), exc.kind) from None
        if not ok:
            raise EngineOpError(f"{what}: {message}")

    async def info(self, target: Target, kind: InfoKind, request_id: str) -> Reply:
        try:
            client = await self._client()
            message: Any = await (
                client.server_info(CONTROL_SECS)
                if kind == "server"
                else client.model_info(CONTROL_SECS)
            )
        except SchedulerError as exc:
            raise EngineOpError(str(exc), exc.kind) from None
        body = str(MessageToJson(message, preserving_proto_field_name=True)).encode()
        return Reply(200, [JSON_CONTENT], body)

    async def close(self) -> None:
        """Close now, retiring channels included: calls still running are cancelled (at
        shutdown, after the drain)."""
        await self.channel.close()
