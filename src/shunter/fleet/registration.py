"""Worker registration: wait for the worker, detect its runtime, discover its models.

This is the control plane: it runs in background jobs, never on the request path. The
steps follow smg's ``local_worker_registration`` workflow (inventory §2.3): reach the
worker, discover metadata, expand DP ranks, register, activate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from shunter.aio.once import OnceCell
from shunter.config import ConfigError, grpc_available, validate_worker_url
from shunter.core.grpc_discovery import describe, first_to_answer, health_problem
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.worker import ConnectionMode, Runtime, Worker, WorkerType
from shunter.policies.factory import PolicyError, create_policy
from shunter.transport.base import UpstreamClient, UpstreamError

log = logging.getLogger("shunter.registration")

RUNTIME_NAMES = {r.value: r for r in Runtime} | {"external": Runtime.OPENAI}


class SpecError(ValueError):
    """A worker spec from the API or the CLI is invalid."""


@dataclass
class WorkerSpec:
    """What a user says about a worker (``POST /workers`` or ``--worker-urls``)."""

    url: str
    api_key: str | None = None
    model_id: str | None = None
    worker_type: WorkerType = WorkerType.REGULAR
    bootstrap_port: int | None = None
    runtime: Runtime | None = None  # None: detect
    labels: dict[str, str] = field(default_factory=dict)
    probe_grpc: bool = False  # given without a scheme: probe HTTP and gRPC at once

    @classmethod
    def from_json(cls, payload: Any) -> WorkerSpec:
        if not isinstance(payload, dict):
            raise SpecError("the body must be a JSON object")
        url = payload.get("url")
        if not isinstance(url, str) or not url:
            raise SpecError("'url' is required and must be a string")
        try:
            url = validate_worker_url(url)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        if url.startswith("grpc://") and not grpc_available():
            raise SpecError("grpc:// workers need the grpc extra: pip install 'shunter[grpc]'")
        probe_grpc = "://" not in payload["url"]
        labels = _string_map(payload.get("labels"), "labels")
        _parser_labels(payload, labels)
        for key in ("priority", "cost"):
            value = payload.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise SpecError(f"'{key}' must be a non-negative number")
                labels[key] = str(value)
        if "policy" in labels:
            try:
                create_policy(labels["policy"])
            except PolicyError as exc:
                raise SpecError(f"labels.policy: {exc}") from None
        spec = cls(url=url, labels=labels, probe_grpc=probe_grpc)
        spec.api_key = _optional_str(payload, "api_key")
        spec.model_id = _optional_str(payload, "model_id")
        kind = _optional_str(payload, "worker_type") or "regular"
        try:
            spec.worker_type = WorkerType(kind)
        except ValueError:
            raise SpecError("'worker_type' must be regular, prefill or decode") from None
        runtime = _optional_str(payload, "runtime")
        if runtime is not None:
            if runtime not in RUNTIME_NAMES:
                raise SpecError(f"'runtime' must be one of {', '.join(sorted(RUNTIME_NAMES))}")
            spec.runtime = RUNTIME_NAMES[runtime]
        port = payload.get("bootstrap_port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise SpecError("'bootstrap_port' must be a port number")
        spec.bootstrap_port = port
        return spec


def _parser_labels(payload: dict[str, Any], labels: dict[str, str]) -> None:
    """The per-worker output parsers of a gRPC worker (smg's ``reasoning_parser`` and
    ``tool_parser`` fields), kept as labels, which the gRPC path reads."""
    from shunter.parsers.reasoning import REASONING_PARSERS
    from shunter.parsers.tool_calls import TOOL_CALL_PARSERS

    for key, known in (("reasoning_parser", REASONING_PARSERS), ("tool_parser", TOOL_CALL_PARSERS)):
        value = _optional_str(payload, key)
        if value is not None:
            if value not in known:
                raise SpecError(f"'{key}' must be one of {', '.join(known)}")
            labels[key] = value


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise SpecError(f"'{key}' must be a string")
    return value


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"'{name}' must be an object of strings")
    return {str(k): str(v) for k, v in value.items()}


@dataclass
class Discovery:
    runtime: Runtime
    models: tuple[str, ...]
    dp_size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Registrar:
    """Adds, updates and removes workers; the only writer of the registry."""

    def __init__(
        self,
        registry: WorkerRegistry,
        control: UpstreamClient,
        new_client_cell: Callable[[str], OnceCell[UpstreamClient]],
        *,
        new_scheduler_cell: Callable[[str], OnceCell[Any]] | None = None,
        probe_timeout_secs: float = 5.0,
        startup_timeout_secs: float,
        check_interval_secs: float,
        dp_aware: bool = False,
        on_change: Callable[[Sequence[Worker], Sequence[Worker]], None] | None = None,
    ) -> None:
        self.registry = registry
        self.control = control
        self.new_client_cell = new_client_cell
        self.new_scheduler_cell = new_scheduler_cell  # None: gRPC support not installed
        self.probe_timeout_secs = probe_timeout_secs
        self.startup_timeout_secs = startup_timeout_secs
        self.check_interval_secs = check_interval_secs
        self.dp_aware = dp_aware
        self.on_change = on_change

    # --- add --------------------------------------------------------------------------------

    async def add(self, spec: WorkerSpec) -> list[Worker]:
        if self.registry.get_by_url(spec.url) or self.registry.get_by_url(spec.url + "@0"):
            raise SpecError(f"worker {spec.url} already exists; use PUT to update it")
        headers = _auth_headers(spec.api_key)
        if spec.url.startswith("grpc://"):
            return await self._add_grpc(spec, self._scheduler_cell(spec.url), wait=True)
        if spec.probe_grpc and self.new_scheduler_cell is not None:
            grpc_url = "grpc://" + spec.url.split("://", 1)[1]
            cell = self._scheduler_cell(grpc_url)
            mode = await first_to_answer(
                lambda: self._wait_until_reachable(spec.url, headers),
                lambda: self._wait_grpc(cell),
            )
            if mode == "grpc":
                return await self._add_grpc(dataclasses.replace(spec, url=grpc_url), cell)
            await cell.close()
        else:
            await self._wait_until_reachable(spec.url, headers)
        found = await self.discover(spec.url, headers, spec.runtime)
        workers = self._build(spec, found)
        for worker in workers:
            self.registry.register(worker)
        for worker in workers:
            worker.healthy = True
        log.info(
            "worker registered",
            extra={
                "url": spec.url,
                "runtime": found.runtime.value,
                "models": list(found.models),
                "ranks": len(workers),
            },
        )
        self._changed(workers, ())
        return workers

    def _scheduler_cell(self, url: str) -> OnceCell[Any]:
        if self.new_scheduler_cell is None:
            raise SpecError(
                f"{url}: gRPC workers need the grpc extra (pip install 'shunter[grpc]')"
            )
        return self.new_scheduler_cell(url)

    async def _add_grpc(
        self, spec: WorkerSpec, cell: OnceCell[Any], wait: bool = False
    ) -> list[Worker]:
        """Register a gRPC worker: health, then model and server info; one channel, ``cell``,
        serves all its requests."""
        try:
            if wait:
                await self._wait_grpc(cell)
            found = await describe(cell, self.probe_timeout_secs)
        except BaseException:
            await cell.close()
            raise
        worker = Worker(
            url=spec.url, models=(spec.model_id or found.model,), worker_type=spec.worker_type,
            bootstrap_port=spec.bootstrap_port, connection_mode=ConnectionMode.GRPC,
            runtime=Runtime.SGLANG, labels={**found.labels, **spec.labels},
            api_key=spec.api_key, base_url=spec.url, scheduler_cell=cell,
        )  # fmt: skip
        self.registry.register(worker)
        worker.healthy = True
        log.info(
            "worker registered",
            extra={"url": spec.url, "runtime": "sglang (gRPC)", "models": list(worker.models)},
        )
        self._changed([worker], ())
        return [worker]

    async def _wait_until_reachable(self, url: str, headers: list[tuple[str, str]]) -> None:
        async def probe() -> str | None:
            try:
                response = await self.control.request("GET", url + "/health", headers, None)
            except UpstreamError as exc:
                return str(exc)
            return None if 200 <= response.status < 300 else f"/health answered {response.status}"

        await self._wait_until(probe, f"worker {url}")

    async def _wait_grpc(self, cell: OnceCell[Any]) -> None:
        await self._wait_until(lambda: health_problem(cell, self.probe_timeout_secs),
                               "gRPC worker")  # fmt: skip

    async def _wait_until(self, probe: Callable[[], Awaitable[str | None]], what: str) -> None:
        """Probe (it returns what is wrong, or None) with growing pauses until it passes;
        TimeoutError with the last reason after the start-up timeout."""
        deadline = time.monotonic() + self.startup_timeout_secs
        delay = 0.05
        while (problem := await probe()) is not None:
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    f"{what} not ready after {self.startup_timeout_secs:g}s: {problem}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0, self.check_interval_secs)

    async def discover(
        self, url: str, headers: list[tuple[str, str]], runtime: Runtime | None
    ) -> Discovery:
        """Ask the worker what it is: SGLang's server info first, else ``/v1/models``."""
        if runtime in (None, Runtime.SGLANG):
            info = await self._get_json(url, ("/server_info", "/get_server_info"), headers)
            if isinstance(info, dict):
                return await self._sglang_discovery(url, headers, info)
            if runtime is Runtime.SGLANG:
                raise LookupError(f"worker {url} has no SGLang /server_info")
        listing = await self._get_json(url, ("/v1/models",), headers)
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not data:
            raise LookupError(f"worker {url} lists no models at /v1/models")
        ids = tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
        if runtime is None:
            owner = str(data[0].get("owned_by", "")).lower() if isinstance(data[0], dict) else ""
            runtime = {"vllm": Runtime.VLLM, "llamacpp": Runtime.LLAMACPP}.get(
                owner, Runtime.OPENAI
            )
        return Discovery(runtime, ids)

    async def _sglang_discovery(
        self, url: str, headers: list[tuple[str, str]], info: dict[str, Any]
    ) -> Discovery:
        name = info.get("served_model_name") or info.get("model_path") or "unknown"
        labels = {"model_path": str(info.get("model_path", name))}
        model_info = await self._get_json(url, ("/model_info", "/get_model_info"), headers)
        if isinstance(model_info, dict):
            if model_info.get("model_type"):
                labels["model_type"] = str(model_info["model_type"])
            if isinstance(model_info.get("architectures"), list):
                labels["architectures"] = ",".join(map(str, model_info["architectures"]))
        dp_size = info.get("dp_size")
        return Discovery(
            Runtime.SGLANG,
            (str(name),),
            dp_size if isinstance(dp_size, int) else None,
            labels,
        )

    async def _get_json(
        self, url: str, paths: Sequence[str], headers: list[tuple[str, str]]
    ) -> Any:
        for path in paths:
            try:
                response = await self.control.request("GET", url + path, headers, None)
            except UpstreamError:
                continue
            if response.status == 200:
                try:
                    return orjson.loads(response.body)
                except orjson.JSONDecodeError:
                    continue
        return None

    def _build(self, spec: WorkerSpec, found: Discovery) -> list[Worker]:
        cell = self.new_client_cell(spec.url)  # DP ranks share one connection pool

        def make(url: str, rank: int | None = None) -> Worker:
            return Worker(
                url=url,
                models=(spec.model_id,) if spec.model_id else found.models,
                worker_type=spec.worker_type,
                bootstrap_port=spec.bootstrap_port,
                runtime=found.runtime,
                labels={**found.labels, **spec.labels},
                api_key=spec.api_key,
                dp_rank=rank,
                dp_size=found.dp_size if rank is not None else None,
                base_url=spec.url,
                client_cell=cell,
            )

        if not self.dp_aware:
            return [make(spec.url)]
        if not found.dp_size or found.dp_size < 1:
            raise LookupError(f"--dp-aware: worker {spec.url} reports no dp_size in /server_info")
        return [make(f"{spec.url}@{rank}", rank) for rank in range(found.dp_size)]

    # --- update and remove ------------------------------------------------------------

    def find(self, url: str) -> list[Worker]:
        """The workers registered at ``url``: the worker itself or its DP ranks."""
        exact = self.registry.get_by_url(url)
        if exact is not None:
            return [exact]
        return [w for w in self.registry.all() if w.base_url == url and w.dp_rank is not None]

    def update(self, url: str, changes: dict[str, Any]) -> list[Worker]:
        """Apply label, priority, cost and api_key changes (an upsert under the same URL)."""
        current = self.find(url)
        if not current:
            raise LookupError(f"worker {url} not found")
        labels = _string_map(changes.get("labels"), "labels")
        for key in ("priority", "cost"):
            if changes.get(key) is not None:
                labels[key] = str(changes[key])
        replaced = []
        for old in current:
            new = dataclasses.replace(
                old, labels={**old.labels, **labels}, breaker=None, breaker_open=False
            )
            if "api_key" in changes:
                new.api_key = changes["api_key"]
            new.healthy = old.healthy
            self.registry.register(new)
            replaced.append(new)
        self._changed(replaced, current)
        return replaced

    def remove(self, url: str) -> list[Worker]:
        removed = self.registry.remove_base_url(url)
        if not removed:
            raise LookupError(f"worker {url} not found")
        log.info("worker removed", extra={"url": url, "ranks": len(removed)})
        self._changed((), removed)
        return removed

    def _changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        if self.on_change is not None:
            self.on_change(added, removed)


def _auth_headers(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []
