"""KV-event ingestion: the gateway's CPU per 1,000 events, and the index's memory per 100k
blocks.

Run: python bench/kv_events_bench.py [--requests 6000] [--rounds 3]

- Ingestion: a publisher in another process (so its CPU is not counted) replays an engine's
  stream over a real ZeroMQ PUB on 127.0.0.1: the sim's prefix cache (16-token blocks,
  capacity 4,096 blocks) serving a chat workload of 32 system prompts of 400 words and
  unique 120-word user turns, so every request stores its new blocks and, once the cache
  is full, evicts as many. The batches are encoded before the clock starts, then sent as
  fast as the PUB takes them (no high-water mark: none is dropped). This process runs the
  gateway's hub (``KvEvents``: one subscriber, its block index) and is measured whole,
  ZeroMQ's I/O thread included, from the first batch to the last one applied. In SGLang's
  format (one page per ``BlockStored``) and vLLM's (a request's run of blocks in one).
  Each figure is the run of median CPU among ``--rounds``.
- The same batches decoded and applied in a plain loop (no socket, no event loop): what
  the wire format and the index cost alone.
- Memory: ``tracemalloc`` over a block index holding 100k blocks (chains of 50 blocks)
  for one worker, and the same 100k blocks held by 4 workers.

The last line is ``kv events cpu ms per 1k events: sglang=<ms> vllm=<ms>``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
import tracemalloc
from multiprocessing.connection import Connection

import msgspec
import zmq

from common import free_port
from shunter.kv_events.hub import KvEvents
from shunter.kv_events.index import BlockIndex
from shunter.kv_events.wire import BlockStored, decode_message
from shunter.sim.cache import CacheEvent, PrefixCache
from shunter.sim.kv_events import sglang_events, vllm_events
from shunter.tokenizer.words import text_ids

BLOCK = 16
CAPACITY_BLOCKS = 4096
SYSTEM_PROMPTS = 32
SYSTEM_WORDS = 400
USER_WORDS = 120
WORKER = "http://127.0.0.1:1"


def engine_batches(requests: int, fmt: str) -> list[bytes]:
    """The payloads an engine would publish for ``requests`` chat requests, one per
    request that changed its cache."""
    rng = random.Random(7)
    systems = [[f"s{p}w{i}" for i in range(SYSTEM_WORDS)] for p in range(SYSTEM_PROMPTS)]
    steps: list[list[CacheEvent]] = []
    cache = PrefixCache(CAPACITY_BLOCKS * BLOCK, BLOCK, listener=steps.append)
    for request in range(requests):
        user = [f"r{request}u{i}" for i in range(USER_WORDS)]
        cache.match_and_insert(rng.choice(systems) + user)
    convert = sglang_events if fmt == "sglang" else vllm_events
    encoder = msgspec.msgpack.Encoder()
    return [encoder.encode([time.time(), convert(step, BLOCK), 0]) for step in steps]


def publish(endpoint: str, fmt: str, requests: int, pipe: Connection) -> None:
    """The engine's side, in its own process: encode, then send on the PUB when told."""
    payloads = engine_batches(requests, fmt)
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 5000)
    pub.bind(endpoint)
    pipe.send(len(payloads))
    probe = msgspec.msgpack.encode([time.time(), [], 0])
    # Batch 0 (no events) until the subscriber has it: a SUB misses what is sent before
    # its subscription reaches the PUB.
    while not pipe.poll(0.01):
        pub.send_multipart([b"", (0).to_bytes(8, "big"), probe])
    pipe.recv()
    for seq, payload in enumerate(payloads, start=1):
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
    pipe.recv()  # the subscriber has them all
    pub.close()
    context.term()


async def ingest(fmt: str, requests: int) -> dict[str, float]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    parent, child = multiprocessing.Pipe()
    publisher = multiprocessing.get_context("spawn").Process(
        target=publish, args=(endpoint, fmt, requests, child)
    )
    publisher.start()
    batches = await asyncio.to_thread(parent.recv)
    hub = KvEvents(text_ids)
    hub.add(WORKER, "m", endpoint, None)
    subscriber = hub.subscribers[WORKER]
    counters = subscriber.counters
    try:
        while counters.batches == 0:
            await asyncio.sleep(0.01)
        cpu, wall = time.process_time(), time.perf_counter()
        parent.send("go")
        deadline = wall + 300
        while subscriber.last_seq != batches and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        parent.send("done")
        assert subscriber.last_seq == batches, "the stream did not arrive whole"
        assert not counters.gaps and not counters.resyncs, vars(counters)
        index = hub.index.of("m")
        return {
            "batches": counters.batches - 1,
            "events": counters.events,
            "blocks_stored": index.counters.stored_blocks,
            "cpu": cpu,
            "wall": wall,
            "held": index.blocks_of(WORKER),
        }
    finally:
        await hub.close()
        await asyncio.to_thread(publisher.join, 10)


def apply_alone(fmt: str, requests: int) -> tuple[float, float, int]:
    """The CPU of decoding the same batches, and of applying them, without the socket."""
    payloads = engine_batches(requests, fmt)
    frames = [[b"", seq.to_bytes(8, "big"), p] for seq, p in enumerate(payloads)]
    start = time.process_time()
    batches = [decode_message(f) for f in frames]
    decode = time.process_time() - start
    index = BlockIndex()
    start = time.process_time()
    for batch in batches:
        for event in batch.events:
            index.apply(WORKER, event)
    apply = time.process_time() - start
    return decode, apply, sum(len(b.events) for b in batches)


def index_memory(blocks: int, workers: int) -> float:
    """Bytes per block of an index holding ``blocks`` blocks on each of ``workers``."""
    chain = 50
    events = []
    for run in range(blocks // chain):
        hashes = tuple(run * chain + i + 1 for i in range(chain))
        tokens = tuple(range(run * chain * BLOCK, (run + 1) * chain * BLOCK))
        events.append(BlockStored(hashes, None, tokens, BLOCK, "GPU"))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = BlockIndex()
    for worker in range(workers):
        for event in events:
            index.apply(f"http://w{worker}:1", event)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.blocks_of("http://w0:1") == blocks
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_1k: dict[str, float] = {}
    print(
        "format | batches | events | blocks stored | wall s | CPU s | "
        "CPU ms / 1k events | CPU ms / 1k blocks | decode ms / 1k | apply ms / 1k"
    )
    for fmt in ("sglang", "vllm"):
        runs = [asyncio.run(ingest(fmt, args.requests)) for _ in range(args.rounds)]
        run = sorted(runs, key=lambda r: r["cpu"])[len(runs) // 2]  # the median run
        decode, apply, events = apply_alone(fmt, args.requests)
        assert events == run["events"]
        per_1k[fmt] = run["cpu"] / run["events"] * 1e6
        print(
            f"{fmt} | {run['batches']:.0f} | {run['events']:.0f} | {run['blocks_stored']:.0f} | "
            f"{run['wall']:.2f} | {run['cpu']:.2f} | {per_1k[fmt]:.2f} | "
            f"{run['cpu'] / run['blocks_stored'] * 1e6:.2f} | "
            f"{decode / events * 1e6:.2f} | {apply / events * 1e6:.2f}"
        )
    for workers in (1, 4):
        used = index_memory(100_000, workers)
        print(
            f"index memory, 100k blocks on {workers} worker(s): {used / 2**20:.1f} MiB "
            f"({used / 100_000 / workers:.0f} B per worker-block)"
        )
    print(
        "kv events cpu ms per 1k events: "
        + " ".join(f"{fmt}={ms:.2f}" for fmt, ms in per_1k.items())
    )


if __name__ == "__main__":
    main()
