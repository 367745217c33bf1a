"""The floor of a Python gRPC data plane: a bare client's CPU per call and per message.

Run: python bench/grpc_floor.py PORT   (a ``shunter sim --grpc`` listening on PORT)

A client that only calls ``Generate`` and reads the answers, with no gateway around it: what
every Python gateway built on that client pays before doing any work of its own. Issue 17
asks Shunter's gRPC path to spend no more CPU than smg's whole gateway (Rust) per chat and
per streamed token; when the bare client alone spends more, the target is out of reach on
that client, whatever the gateway does. ``grpc_bench.py`` runs this on the gateways' core
in the same run as smg.

- ``grpc.aio`` (what Shunter uses): 16 concurrent unary calls of 16 tokens
  (``stream=false``: one message each, as a whole chat is), then 16 concurrent streams of 64
  tokens (65 messages each: a chunk per token and the finishing message).
- ``grpclib`` (pure Python over ``h2``), when installed: the same two loads.
- ``h2``, when the h2 library is installed (grpclib brings it): the least a Python client
  over ``h2`` does: one connection, a call's headers and its one framed message, the
  answers' frames cut into messages and parsed, the flow-control window acknowledged, the
  call's grpc-status read (a failed call, a reset or a lost connection raises); no header
  validation, no deadline timer, no cancellation, no keepalive. Not a client to ship: the
  floor under any Python HTTP/2 client that does what a gateway needs.

The event loop is uvloop's, as the gateway's is. Output: one ``floor:`` line per client.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import grpc
import uvloop
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from common import cpu_seconds

GENERATE = "/sglang.grpc.scheduler.SglangScheduler/Generate"
CONCURRENT = 16
PROMPT_IDS = list(range(100, 300))

Call = Callable[[Any], Awaitable[int]]  # one Generate call: the messages it read
Client = Callable[[int], Coroutine[Any, Any, tuple[float, float]]]  # port -> per call, message


def request(index: int, stream: bool) -> Any:
    return pb.GenerateRequest(
        request_id=f"floor-{index}",
        tokenized=pb.TokenizedInput(original_text="floor", input_ids=PROMPT_IDS),
        sampling_params=pb.SamplingParams(
            max_new_tokens=64 if stream else 16, temperature=1, top_p=1, top_k=-1
        ),
        stream=stream,
    )


async def measure(call: Call, calls: int, stream: bool) -> tuple[float, float]:
    """CPU µs per call and per message over ``calls`` calls, ``CONCURRENT`` at a time,
    after a warm-up."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(index: int) -> int:
        async with gate:
            return await call(request(index, stream))

    await asyncio.gather(*(one(i) for i in range(100)))
    before = cpu_seconds(os.getpid())
    messages = sum(await asyncio.gather(*(one(i) for i in range(calls))))
    spent = (cpu_seconds(os.getpid()) - before) * 1e6
    return spent / calls, spent / max(1, messages)


async def grpc_aio(port: int) -> tuple[float, float]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    unary = channel.unary_unary(
        GENERATE,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    streamed = channel.unary_stream(
        GENERATE,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )

    async def whole(message: Any) -> int:
        await unary(message, timeout=30)
        return 1

    async def stream(message: Any) -> int:
        return sum([1 async for _ in streamed(message, timeout=30)])

    try:
        per_call, _ = await measure(whole, 3000, stream=False)
        _, per_message = await measure(stream, 400, stream=True)
    finally:
        await channel.close()
    return per_call, per_message


class _MinimalCall:
    """One ``Generate`` on the minimal h2 connection: the answers parsed so far, and how it
    ended (``failure`` None: with grpc-status 0)."""

    __slots__ = ("buffer", "ended", "failure", "messages", "status", "waiter")

    def __init__(self) -> None:
        self.buffer = b""
        self.messages: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.status: bytes | None = None  # grpc-status, from the trailers
        self.ended = False
        self.failure: str | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def end(self, failure: str | None = None) -> None:
        if failure is None and self.status != b"0":
            failure = f"grpc-status {self.status!r}"
        if failure is None and self.buffer:
            failure = f"{len(self.buffer)} bytes of a message cut short"
        self.ended, self.failure = True, failure
        self.wake()


class _MinimalH2(asyncio.Protocol):
    """The h2 connection the minimal client's calls share."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection
        import h2.events

        self.events = h2.events
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.calls: dict[int, _MinimalCall] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        transport = self.transport
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**30)
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.h2.receive_data(data):
            if isinstance(event, self.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                call = self.calls.get(event.stream_id)
                if call is None:
                    continue
                buffer = call.buffer + event.data
                while len(buffer) >= 5 and len(buffer) >= 5 + (
                    size := int.from_bytes(buffer[1:5], "big")
                ):
                    call.messages.append(pb.GenerateResponse.FromString(buffer[5 : 5 + size]))
                    buffer = buffer[5 + size :]
                call.buffer = buffer
                call.wake()
            elif isinstance(event, self.events.ResponseReceived | self.events.TrailersReceived):
                call = self.calls.get(event.stream_id)
                status = dict(event.headers).get(b"grpc-status")
                if call is not None and status is not None:
                    call.status = status
            elif isinstance(event, self.events.StreamEnded):
                if (ended := self.calls.pop(event.stream_id, None)) is not None:
                    ended.end()
            elif isinstance(event, self.events.StreamReset):
                if (ended := self.calls.pop(event.stream_id, None)) is not None:
                    ended.end(f"reset ({event.error_code!r})")
            elif isinstance(event, self.events.ConnectionTerminated):
                # Calls the sim took (up to last_stream_id) may still finish; later ones never.
                last = event.last_stream_id or 0
                self._fail_all(f"the sim sent GOAWAY ({event.error_code!r})", after=last)
        if pending := self.h2.data_to_send():
            self.transport.write(pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(f"the connection closed ({exc!r})")

    def _fail_all(self, reason: str, after: int = 0) -> None:
        """End every call on a stream above ``after`` with ``reason``."""
        for stream_id in [s for s in self.calls if s > after]:
            self.calls.pop(stream_id).end(reason)

    async def call(self, message: Any) -> int:
        """Send ``message`` to ``Generate`` and read every answer: how many came (a call that
        did not end with grpc-status 0 raises: a floor measured on failures is no floor)."""
        assert self.transport is not None
        stream_id = self.h2.get_next_available_stream_id()
        call = self.calls[stream_id] = _MinimalCall()
        self.h2.send_headers(stream_id, MINIMAL_HEADERS)
        body = message.SerializeToString()
        self.h2.send_data(stream_id, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        self.transport.write(self.h2.data_to_send())
        read = 0
        while True:
            while call.messages:
                call.messages.popleft()
                read += 1
            if call.ended:
                if call.failure is not None:
                    raise RuntimeError(f"Generate failed: {call.failure}")
                return read
            call.waiter = asyncio.get_running_loop().create_future()
            await call.waiter


MINIMAL_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", GENERATE.encode()),
    (b":authority", b"127.0.0.1"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"30S"),
]


async def h2_minimal(port: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    transport, connection = await loop.create_connection(_MinimalH2, "127.0.0.1", port)
    try:
        per_call, _ = await measure(connection.call, 3000, stream=False)
        _, per_message = await measure(connection.call, 400, stream=True)
    finally:
        transport.close()
    return per_call, per_message


async def grpclib_client(port: int) -> tuple[float, float]:
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    channel = Channel("127.0.0.1", port)

    async def call(message: Any) -> int:
        kind = Cardinality.UNARY_STREAM
        async with channel.request(
            GENERATE, kind, pb.GenerateRequest, pb.GenerateResponse, timeout=30
        ) as exchange:
            await exchange.send_message(message, end=True)
            return sum([1 async for _ in exchange])

    try:
        per_call, _ = await measure(call, 2000, stream=False)
        _, per_message = await measure(call, 300, stream=True)
    finally:
        channel.close()
    return per_call, per_message


def installed() -> dict[str, Client]:
    """The clients this environment can run, by name: each named for the library it needs
    (grpclib and h2 come with the bench extra)."""
    clients: dict[str, Client] = {"grpc.aio": grpc_aio}
    for name, client in (("grpclib", grpclib_client), ("h2", h2_minimal)):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        clients[name] = client
    return clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--clients", default="", help="comma-separated names to run (default: every installed)"
    )
    args = parser.parse_args()
    port = args.port
    clients = installed()
    if args.clients:
        clients = {name: clients[name] for name in args.clients.split(",")}
    for name, client in clients.items():
        began = time.perf_counter()
        per_call, per_message = uvloop.run(client(port))
        print(
            f"floor: {name} | {per_call:.0f} us CPU per whole call | "
            f"{per_message:.1f} us per streamed message | {time.perf_counter() - began:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
