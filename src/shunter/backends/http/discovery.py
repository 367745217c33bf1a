"""What an HTTP worker is: its engine and models, asked of the worker itself.

SGLang answers ``/server_info`` (older versions ``/get_server_info``) with its model and DP
size, and ``/model_info`` with the architecture. Every other engine is asked
``/v1/models``; the ``owned_by`` of its first model tells vLLM and llama.cpp apart from a
generic OpenAI-compatible server. A runtime given at registration skips the guessing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from shunter.backends.base import Description, Runtime, Target
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines import ENGINES, engine_owning


async def describe(calls: WorkerCalls, target: Target, runtime: Runtime | None) -> Description:
    """Ask the worker what it is: SGLang's server info first, else ``/v1/models``."""
    if runtime in (None, Runtime.SGLANG):
        info = await calls.get_json(target, ("/server_info", "/get_server_info"))
        if isinstance(info, dict):
            return await _sglang(calls, target, info)
        if runtime is Runtime.SGLANG:
            raise LookupError(f"worker {target.url} has no SGLang /server_info")
    listing = await calls.get_json(target, ("/v1/models",))
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list) or not data:
        raise LookupError(f"worker {target.url} lists no models at /v1/models")
    ids = tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
    if runtime is None:
        owner = str(data[0].get("owned_by", "")).lower() if isinstance(data[0], dict) else ""
        runtime = engine_owning(owner).runtime
    runtime = ENGINES[runtime].runtime
    slots = await _llamacpp_slots(calls, target) if runtime is Runtime.LLAMACPP else None
    return Description(runtime, ids, slots=slots)


async def _llamacpp_slots(calls: WorkerCalls, target: Target) -> int | None:
    """llama.cpp's slot count (``/props``: ``total_slots``); None if it does not say."""
    props = await calls.get_json(target, ("/props",))
    slots = props.get("total_slots") if isinstance(props, dict) else None
    if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
        return slots
    return None


async def _sglang(calls: WorkerCalls, target: Target, info: dict[str, Any]) -> Description:
    name = info.get("served_model_name") or info.get("model_path") or "unknown"
    labels = {"model_path": str(info.get("model_path", name))}
    model_info = await calls.get_json(target, ("/model_info", "/get_model_info"))
    if isinstance(model_info, dict):
        if model_info.get("model_type"):
            labels["model_type"] = str(model_info["model_type"])
        if isinstance(model_info.get("architectures"), list):
            labels["architectures"] = ",".join(map(str, model_info["architectures"]))
    endpoint = _kv_events_endpoint(info.get("kv_events"), target.base_url)
    if endpoint is not None:
        labels["kv_events_endpoint"] = endpoint
    dp_size = info.get("dp_size")
    return Description(
        Runtime.SGLANG, (str(name),), dp_size if isinstance(dp_size, int) else None, labels
    )


def _kv_events_endpoint(advertised: Any, base_url: str) -> str | None:
    """The KV-events endpoint SGLang advertises in its server info (``kv_events``:
    ``endpoint_host``, ``endpoint_port_base``), as a ``tcp://`` address; a wildcard host
    (it binds ``*``) is the worker's own host. None when it publishes none, or says it
    oddly (a given ``kv_events_endpoint`` label takes precedence anyway)."""
    if not isinstance(advertised, dict):
        return None
    port = advertised.get("endpoint_port_base")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    host = advertised.get("endpoint_host")
    if not isinstance(host, str) or host in ("", "*", "0.0.0.0", "::", "[::]"):
        host = urlsplit(base_url).hostname or ""
        if ":" in host:
            host = f"[{host}]"
    if not host or any(c in host for c in "/@ "):
        return None
    return f"tcp://{host}:{port}"
