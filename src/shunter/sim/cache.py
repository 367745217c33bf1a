"""A KV prefix cache model: token blocks, a capacity in tokens, LRU eviction.

Like a real engine's radix/paged cache, a prompt's tokens are cut into fixed-size blocks;
a block is identified by the hash of everything up to and including it, so a block only
matches when the whole prefix before it matches too.

With a ``listener`` (``--kv-events-endpoint``), the cache reports what it does as an engine
publishes it: one ``Stored`` per newly cached block (hits are not announced again), one
``Removed`` per evicted block, ``Cleared`` on a flush; one call per step (a request's
insertion, or a flush), nothing for a step that changed nothing. Each block then also
carries SGLang's page digest: SHA-256 over the previous page's digest and the page's token
ids as 4-byte little-endian integers, which is what the engine's published hash is cut
from. Without a listener none of that is computed, so the sim's hot path is unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shunter.tokenizer.words import word_ids


@dataclass(frozen=True, slots=True)
class Stored:
    digest: bytes
    parent: bytes | None  # the previous block's digest; None for a prompt's first block
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class Removed:
    digest: bytes


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


CacheEvent = Stored | Removed | Cleared
Listener = Callable[[list[CacheEvent]], None]


def page_digest(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SGLang's page hash: the parent's raw digest (if any), then each id as 4 bytes LE."""
    sha = hashlib.sha256()
    if parent is not None:
        sha.update(parent)
    for token in token_ids:
        sha.update((token & 0xFFFFFFFF).to_bytes(4, "little"))
    return sha.digest()


class PrefixCache:
    def __init__(
        self, capacity_tokens: int, block_size: int = 16, listener: Listener | None = None
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.capacity_blocks = max(0, capacity_tokens // block_size)
        # block key -> its digest when events are published, else None
        self._blocks: OrderedDict[int, bytes | None] = OrderedDict()
        self.listener = listener
        self.hit_tokens = 0
        self.lookup_tokens = 0

    def _block_keys(self, tokens: Sequence[str]) -> list[int]:
        keys: list[int] = []
        running = 0
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            running = hash((running, *tokens[start : start + size]))
            keys.append(running)
        return keys

    def match_and_insert(self, tokens: Sequence[str]) -> int:
        """Return how many leading tokens were cached, then cache the whole prompt."""
        keys = self._block_keys(tokens)
        cached_blocks = 0
        for key in keys:
            if key not in self._blocks:
                break
            cached_blocks += 1
        if self.listener is not None:
            self._insert_announced(keys, tokens)
        else:
            for key in keys:
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                else:
                    self._blocks[key] = None
            while len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
        cached = cached_blocks * self.block_size
        self.hit_tokens += cached
        self.lookup_tokens += len(tokens)
        return cached

    def _insert_announced(self, keys: list[int], tokens: Sequence[str]) -> None:
        """``match_and_insert``'s insertion, telling the listener what was stored and
        evicted, in the order it happened."""
        events: list[CacheEvent] = []
        size = self.block_size
        parent: bytes | None = None
        for index, key in enumerate(keys):
            digest = self._blocks.get(key)
            if key in self._blocks and digest is not None:
                self._blocks.move_to_end(key)
            else:
                ids = word_ids(tokens[index * size : (index + 1) * size])
                digest = page_digest(parent, ids)
                self._blocks[key] = digest
                events.append(Stored(digest, parent, ids))
            parent = digest
        while len(self._blocks) > self.capacity_blocks:
            _, evicted = self._blocks.popitem(last=False)
            if evicted is not None:
                events.append(Removed(evicted))
        if events and self.listener is not None:
            self.listener(events)

    def flush(self) -> None:
        self._blocks.clear()
        if self.listener is not None:
            self.listener([Cleared()])

    @property
    def used_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
