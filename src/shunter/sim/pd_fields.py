"""The fields a PD request carries to join its two legs, read and checked.

SGLang: ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room`` in the body of both
legs; for a batch, arrays of the batch's length, one room per item. vLLM (NIXL connector):
``kv_transfer_params``, asking the prefill to keep the KV for a remote decode, and handing
the decode what the prefill answered. A request whose fields are missing or malformed is
refused with a message naming them, as SGLang's and vLLM's own checks would stop it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


class PdFieldError(ValueError):
    """The request lacks, or garbles, what joins it to its other leg."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Bootstrap:
    """Where one item's prefill publishes its room, and the room."""

    host: str
    port: int | None  # None: the decode's own --disaggregation-bootstrap-port
    room: int


def bootstrap_items(body: dict[str, Any], role: str, batch: int | None) -> list[Bootstrap]:
    """One ``Bootstrap`` per item: ``batch`` items (arrays), or one (scalars) when None."""
    missing = [name for name in BOOTSTRAP_FIELDS if name not in body]
    if missing:
        raise PdFieldError(
            f"{role} worker needs bootstrap_host, bootstrap_port and bootstrap_room "
            f"(missing: {', '.join(missing)})"
        )
    host, port, room = (body[name] for name in BOOTSTRAP_FIELDS)
    if batch is None:
        return [_one(host, port, room, role)]
    columns = (host, port, room)
    if not all(isinstance(c, list) and len(c) == batch for c in columns):
        raise PdFieldError(
            f"{role} worker: a batch of {batch} needs bootstrap_host, bootstrap_port and "
            f"bootstrap_room as arrays of {batch}, one room per item"
        )
    return [_one(h, p, r, role) for h, p, r in zip(host, port, room, strict=True)]


def _one(host: Any, port: Any, room: Any, role: str) -> Bootstrap:
    if not isinstance(host, str) or not host:
        raise PdFieldError(f"{role} worker: bootstrap_host must be a host name, got {host!r}")
    if port is not None and not (_is_int(port) and 0 < port < 65536):
        raise PdFieldError(f"{role} worker: bootstrap_port must be a port or null, got {port!r}")
    if not _is_int(room) or room < 0:
        raise PdFieldError(f"{role} worker: bootstrap_room must be an integer, got {room!r}")
    return Bootstrap(host, port, room)


# The fields a NIXL decode reads from its kv_transfer_params to pull the prefill's blocks.
REMOTE_FIELDS = (
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "remote_request_id",
)


@dataclass(frozen=True)
class RemotePrefill:
    """Where a vLLM decode pulls its KV from: the prefill's bootstrap server and transfer id."""

    host: str
    port: int
    request_id: str


def vllm_prefill_params(body: dict[str, Any]) -> None:
    """Check a vLLM prefill leg: it must be asked to keep its KV for a remote decode."""
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
        raise PdFieldError(
            'prefill worker needs "kv_transfer_params": {"do_remote_decode": true, ...}'
        )


def vllm_decode_params(body: dict[str, Any]) -> RemotePrefill:
    """Read a vLLM decode leg's kv_transfer_params: what its prefill answered."""
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict):
        raise PdFieldError(
            'decode worker needs "kv_transfer_params" from its prefill\'s answer '
            f"(do_remote_prefill: true, {', '.join(REMOTE_FIELDS)})"
        )
    missing = [name for name in REMOTE_FIELDS if params.get(name) is None]
    if params.get("do_remote_prefill") is not True:
        missing.insert(0, "do_remote_prefill: true")
    if missing:
        raise PdFieldError(f"decode worker: kv_transfer_params lacks {', '.join(missing)}")
    host, port, request_id = (
        params["remote_host"],
        params["remote_port"],
        params["remote_request_id"],
    )
    if not isinstance(host, str) or not _is_int(port) or not isinstance(request_id, str):
        raise PdFieldError(
            "decode worker: kv_transfer_params needs remote_host and remote_request_id as "
            "strings and remote_port as an integer"
        )
    return RemotePrefill(host, port, request_id)


def nixl_transfer_params(
    engine_id: str, host: str, port: int, prompt_tokens: int, block_size: int
) -> dict[str, Any]:
    """What a vLLM prefill with the NIXL connector answers in ``kv_transfer_params``.

    NIXL's fields: the decode pulls blocks ``remote_block_ids`` of engine
    ``remote_engine_id`` from ``remote_host:remote_port``, naming the transfer by
    ``remote_request_id``. The sim's port is its bootstrap server's.
    """
    blocks = max(1, -(-prompt_tokens // block_size))
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": engine_id,
        "remote_block_ids": list(range(blocks)),
        "remote_host": host,
        "remote_port": port,
        "remote_request_id": f"xfer-{uuid.uuid4().hex}",
        "tp_size": 1,
    }
