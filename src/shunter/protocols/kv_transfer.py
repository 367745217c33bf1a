"""vLLM's two-phase disaggregation: ``kv_transfer_params`` out of the prefill, into the decode.

vLLM's KV connectors (NIXL, Mooncake) hand the cache over the other way round from SGLang:
the prefill worker runs first, as a one-token request marked for remote decoding, and its
answer says where the cache is; the decode worker is then sent the client's request with
those parameters and pulls the cache before generating. The fields, as vLLM's
``NixlConnector`` reads them:

- prefill request: the client's body with ``stream: false`` (``stream_options`` dropped),
  ``max_tokens: 1`` (and ``max_completion_tokens: 1`` when the client set that), ``min_tokens``
  dropped, ``n: 1``, and ``kv_transfer_params: {"do_remote_decode": true,
  "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
  "remote_host": null, "remote_port": null}``;
- prefill answer: a whole JSON body whose top-level ``kv_transfer_params`` (set by the
  connector: ``do_remote_prefill: true``, the engine id, block ids, host and port) is taken
  as it is;
- decode request: the client's body, with ``kv_transfer_params`` set to those.
"""

from __future__ import annotations

from typing import Any

import orjson

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: bytes) -> bytes:
    """The prefill leg's request: one token, whole, marked for a remote decode."""
    payload = orjson.loads(body)
    payload["stream"] = False
    payload.pop("stream_options", None)
    payload.pop("min_tokens", None)
    payload["n"] = 1
    payload["max_tokens"] = 1
    if "max_completion_tokens" in payload:
        payload["max_completion_tokens"] = 1
    payload["kv_transfer_params"] = dict(PREFILL_PARAMS)
    return orjson.dumps(payload)


def transfer_params(prefill_answer: bytes) -> Any:
    """The ``kv_transfer_params`` a prefill worker answered with; None if it sent none."""
    try:
        payload = orjson.loads(prefill_answer)
    except orjson.JSONDecodeError:
        return None
    return payload.get("kv_transfer_params") if isinstance(payload, dict) else None


def decode_body(body: bytes, params: Any) -> bytes:
    """The decode leg's request: the client's, with the prefill's transfer parameters."""
    payload = orjson.loads(body)
    payload["kv_transfer_params"] = params
    return orjson.dumps(payload)
