"""The simulated engine: running slots with a queue, prefill and decode timing, a prefix cache.

Tokens are whitespace-separated words: crude, but deterministic and cheap, which is all a
routing test needs. The output is a deterministic function of the prompt, as with a real
model at temperature 0.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shunter.sim.cache import PrefixCache
from shunter.sim.config import SimConfig
from shunter.sim.kv_events import KvEventPublisher

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "bright",
    "stars",
    "watch",
    "quietly",
    "above",
    "an",
    "old",
    "stone",
    "bridge",
    "near",
    "the",
    "silver",
    "river",
]


def tokenize(text: str) -> list[str]:
    return text.split()


@dataclass
class Generation:
    """One request's bookkeeping, filled in as the engine runs it."""

    prompt_tokens: list[str]
    max_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False

    @property
    def finish_reason(self) -> str:
        return "length"


@dataclass
class EngineStats:
    requests_total: int = 0
    aborted_total: int = 0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    generation_tokens_total: int = 0
    abort_rpcs: int = 0  # gRPC Abort calls received
    grpc_peers: set[str] = field(default_factory=set)  # distinct client connections seen


class Engine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.kv_events: KvEventPublisher | None = None
        if config.kv_events_endpoint:
            topic = config.kv_events_topic
            self.kv_events = KvEventPublisher(
                config.kv_events_endpoint,
                config.kv_events_replay_endpoint,
                fmt=config.kv_events_format,
                topic=f"kv@{config.name}@{config.served_model_name}" if topic is None else topic,
                block_size=config.block_size,
                faults=config.faults,
            )
        listener = None if self.kv_events is None else self.kv_events.publish
        self.cache = PrefixCache(config.cache_tokens, config.block_size, listener)
        self.stats = EngineStats()
        self.running = 0
        self.waiting = 0
        self.tokens_in_flight = 0
        self._slots = asyncio.Semaphore(config.max_running)

    def output_token(self, generation: Generation, index: int) -> str:
        seed = zlib.crc32(" ".join(generation.prompt_tokens[-64:]).encode())
        return WORDS[(seed + index * 7) % len(WORDS)]

    async def run(self, generation: Generation) -> AsyncIterator[str]:
        """Queue for a slot, prefill, then yield output tokens one by one.

        Leaving the iteration early (the client went away) counts as an abort and frees
        the slot at once.
        """
        config = self.config
        self.stats.requests_total += 1
        self.waiting += 1
        weight = len(generation.prompt_tokens) + generation.max_tokens
        self.tokens_in_flight += weight
        try:
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            try:
                async for token in self._decode(generation, config):
                    yield token
            finally:
                self.running -= 1
                self._slots.release()
        finally:
            self.tokens_in_flight -= weight
            if not generation.finished:
                self.stats.aborted_total += 1

    async def _decode(self, generation: Generation, config: SimConfig) -> AsyncIterator[str]:
        cached = self.cache.match_and_insert(generation.prompt_tokens)
        generation.cached_tokens = cached
        self.stats.prompt_tokens_total += len(generation.prompt_tokens)
        self.stats.cached_tokens_total += cached
        uncached = len(generation.prompt_tokens) - cached
        await asyncio.sleep((config.ttft_ms + uncached * config.prefill_us_per_token / 1000) / 1000)
        for index in range(generation.max_tokens):
            if index:
                await asyncio.sleep(config.itl_ms / 1000)
            generation.completion_tokens += 1
            self.stats.generation_tokens_total += 1
            yield self.output_token(generation, index)
        generation.finished = True

    def embed(self, text: str, dims: int = 16) -> list[float]:
        """A deterministic unit vector for ``text``."""
        values = [((zlib.crc32(f"{i}:{text}".encode()) % 2001) - 1000) / 1000 for i in range(dims)]
        norm = sum(v * v for v in values) ** 0.5 or 1.0
        return [v / norm for v in values]

    def metrics_text(self) -> str:
        s = self.stats
        if self.config.runtime == "llamacpp":
            # llama.cpp's names; its prompt_tokens_total leaves out the cached tokens.
            llama: list[tuple[str, str, float]] = [
                (
                    "llamacpp:prompt_tokens_total",
                    "counter",
                    s.prompt_tokens_total - s.cached_tokens_total,
                ),
                ("llamacpp:tokens_predicted_total", "counter", s.generation_tokens_total),
                ("llamacpp:requests_processing", "gauge", self.running),
                ("llamacpp:requests_deferred", "gauge", self.waiting),
            ]
            return "".join(f"# TYPE {m} {kind}\n{m} {v}\n" for m, kind, v in llama)
        name = self.config.served_model_name
        if self.config.runtime == "vllm":
            # vLLM V1's names; its prefix-cache counters are in tokens, as the sim's are.
            vllm: list[tuple[str, str, float]] = [
                ("vllm:num_requests_running", "gauge", self.running),
                ("vllm:num_requests_waiting", "gauge", self.waiting),
                ("vllm:prompt_tokens_total", "counter", s.prompt_tokens_total),
                ("vllm:generation_tokens_total", "counter", s.generation_tokens_total),
                ("vllm:prefix_cache_queries_total", "counter", self.cache.lookup_tokens),
                ("vllm:prefix_cache_hits_total", "counter", self.cache.hit_tokens),
            ]
            return "".join(
                f'# TYPE {m} {kind}\n{m}{{engine="0",model_name="{name}"}} {v}\n'
                for m, kind, v in vllm
            )
        lines: list[tuple[str, str, float]] = [
            ("sglang:num_running_reqs", "gauge", self.running),
            ("sglang:num_queue_reqs", "gauge", self.waiting),
            ("sglang:num_used_tokens", "gauge", self.cache.used_tokens),
            ("sglang:cache_hit_rate", "gauge", round(self.cache.hit_rate, 6)),
            ("sglang:prompt_tokens_total", "counter", s.prompt_tokens_total),
            ("sglang:generation_tokens_total", "counter", s.generation_tokens_total),
            ("sglang:cached_tokens_total", "counter", s.cached_tokens_total),
            ("sglang:num_requests_total", "counter", s.requests_total),
            ("sglang:num_aborted_requests_total", "counter", s.aborted_total),
        ]
        return "".join(
            f'# TYPE {m} {kind}\n{m}{{model_name="{name}"}} {v}\n' for m, kind, v in lines
        )
