"""A KV prefix cache model: token blocks, a capacity in tokens, LRU eviction.

Like a real engine's radix/paged cache, a prompt's tokens are cut into fixed-size blocks;
a block is identified by the hash of everything up to and including it, so a block only
matches when the whole prefix before it matches too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, capacity_tokens: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.capacity_blocks = max(0, capacity_tokens // block_size)
        self._blocks: OrderedDict[int, None] = OrderedDict()
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

    def flush(self) -> None:
        self._blocks.clear()

    @property
    def used_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
