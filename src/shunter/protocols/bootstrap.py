"""SGLang's bootstrap fields: how a prefill and a decode worker find each other's KV cache.

In SGLang's prefill/decode disaggregation both workers get the same request with three
extra fields: ``bootstrap_host`` (the prefill worker's host), ``bootstrap_port`` (its
bootstrap server's port, or null for the engine's default) and ``bootstrap_room`` (a random
number naming this transfer). The prefill worker computes the KV cache and offers it in
that room; the decode worker fetches it from there and generates.

A batch needs one room per sequence the worker will run, as arrays of that length: every
prompt of a batch (``text`` or ``input_ids`` lists for ``/generate``, a ``prompt`` array for
completions) times ``n`` (the parallel samples per prompt). Two live transfers must never
share a room (a duplicate crashes SGLang's scheduler: sglang #40125), so rooms are fresh
random numbers per attempt, and fields a client sent are replaced, never trusted.

Over HTTP the fields are appended to the client's JSON bytes, which pass through otherwise
unchanged (JSON parsers keep a repeated key's last value, SGLang's and vLLM's included); a
body that already names a bootstrap field is re-encoded without the client's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import orjson

# HTTP rooms are 63-bit (what SGLang's own load balancer draws); gRPC's proto field is an
# int32, so a pair with a gRPC leg draws 31-bit rooms and both legs get the same number.
HTTP_ROOM_BITS = 63
GRPC_ROOM_BITS = 31
# What a gRPC request must name when the prefill worker's bootstrap port is not known: the
# proto's field cannot be null, and this is SGLang's --disaggregation-bootstrap-port default.
SGLANG_DEFAULT_BOOTSTRAP_PORT = 8998
FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_CLIENT_SENT = b'"bootstrap_'


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """Where one attempt's KV cache is handed over: the prefill worker's host and port, and
    a room per sequence. ``batch``: the fields go as arrays (one entry per room).
    ``prefill_dp_rank``: for the decode leg of a DP-aware prefill rank, which rank holds the
    cache (SGLang's ``disagg_prefill_dp_rank``)."""

    host: str
    port: int | None
    rooms: tuple[int, ...]
    batch: bool = False
    prefill_dp_rank: int | None = None

    def fields(self) -> dict[str, Any]:
        """The fields as JSON values."""
        if self.batch:
            count = len(self.rooms)
            fields: dict[str, Any] = {
                "bootstrap_host": [self.host] * count,
                "bootstrap_port": [self.port] * count,
                "bootstrap_room": list(self.rooms),
            }
        else:
            fields = {
                "bootstrap_host": self.host,
                "bootstrap_port": self.port,
                "bootstrap_room": self.rooms[0],
            }
        if self.prefill_dp_rank is not None:
            fields["disagg_prefill_dp_rank"] = self.prefill_dp_rank
        return fields

    def into(self, body: bytes) -> bytes:
        """``body`` (a JSON object) with these fields set, the client's own replaced."""
        if _CLIENT_SENT in body:  # rare: the client named bootstrap fields; drop them
            payload = orjson.loads(body)
            for name in FIELDS:
                payload.pop(name, None)
            payload.update(self.fields())
            return orjson.dumps(payload)
        encoded = orjson.dumps(self.fields())  # b'{"bootstrap_host":...}'
        head = body.rstrip()
        assert head.endswith(b"}"), "the router only routes JSON objects"
        members = head[:-1].rstrip()
        separator = b"" if members.endswith(b"{") else b","
        return members + separator + encoded[1:]


def new_rooms(count: int, bits: int = HTTP_ROOM_BITS) -> tuple[int, ...]:
    """``count`` fresh random rooms of ``bits`` bits (distinct: two live transfers must
    never share one)."""
    rooms: set[int] = set()
    while len(rooms) < count:
        rooms.add(random.getrandbits(bits))
    return tuple(rooms)


def bootstrap_host(url: str) -> str:
    """The host a decode worker reaches a prefill worker's bootstrap server at: the host of
    its URL (a DP rank's ``@k`` suffix and any port dropped; an IPv6 address in brackets, as
    SGLang's own load balancer sends it)."""
    host = urlsplit(url.split("@", 1)[0]).hostname or url
    return f"[{host}]" if ":" in host else host


def sequences(path: str, fields: Any) -> tuple[int, bool]:
    """How many sequences a request runs (rooms needed), and whether it is batch-shaped
    (array fields). ``fields`` is the request's routing fields (``routing.RequestFields``)."""
    prompts: int | None = None  # None: one prompt, not in a list
    if path == "/generate":
        if isinstance(fields.text, list):
            prompts = len(fields.text)
        elif fields.input_ids and isinstance(fields.input_ids[0], list):
            prompts = len(fields.input_ids)
        raw = fields.sampling_params
        sampling = msgspec.json.decode(raw) if raw else None
        if isinstance(sampling, list):  # one per prompt; SGLang needs the same n in each
            sampling = sampling[0] if sampling else None
        samples = _count(sampling.get("n") if isinstance(sampling, dict) else None)
    else:
        prompt = fields.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = len(prompt)  # strings, or token-id lists: one per prompt
        samples = _count(fields.n)
    count = (1 if prompts is None else prompts) * samples
    return max(count, 1), prompts is not None or samples > 1


def _count(value: Any) -> int:
    """A sample count as the worker would read it (anything but an int >= 1 counts one; the
    worker judges and refuses it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1
