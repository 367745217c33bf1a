"""Prefix text on the wire: whole blocks, each sent once and named afterwards by a digest.

A decision is only useful to a peer with its text, since the trees are character radix
trees; but sending the text of every decision would cost several KB per routed request
(a 2,000-word system prompt is ~12,000 characters). Prompts that share a prefix share its
blocks, so the text is cut into blocks of ``BLOCK_CHARS`` characters, each block named by a
chain digest (an 8-byte BLAKE2b of the previous digest and the block, rooted in the model),
and a decision carries the digest of the longest chain the peers have recently been sent
plus only the blocks after it. A repeated system prompt then costs 8 bytes plus the block
that holds its first distinct characters.

Only whole blocks go (the tail shorter than a block is left out: a peer's tree learns the
prefix to within ``BLOCK_CHARS``), at most ``MAX_CHARS`` of them.

"Recently" is ``RESEND_SECS``: a chain older than that is sent again in full, so a peer that
missed it (it was down, or its store evicted it) can resolve references again within that
time. A peer that cannot resolve a reference skips that decision's tree insert (counted).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

BLOCK_CHARS = 256
MAX_CHARS = 32_768  # 128 blocks; a peer's tree still matches a 0.3 share of ~100K-char prompts
RESEND_SECS = 2.0
SENT_CAPACITY = 65_536  # chain digests a sender remembers (8 B key + a float each)
STORE_CAPACITY = 131_072  # blocks a receiver keeps: at most 32 MiB of text


_roots: dict[str, int] = {}


def root(model: str) -> int:
    """The chain's start for ``model``: its prompts never share digests with another's."""
    digest = _roots.get(model)
    if digest is None:
        if len(_roots) > 4096:  # model names come from peers: bound what they can make us keep
            _roots.clear()
        digest = _roots[model] = _digest(0, model)
    return digest


def _digest(parent: int, text: str) -> int:
    data = parent.to_bytes(8, "big") + text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixEncoder:
    """The sender's side: which blocks of a prompt peers have not been sent lately."""

    def __init__(
        self,
        block_chars: int = BLOCK_CHARS,
        max_chars: int = MAX_CHARS,
        resend_secs: float = RESEND_SECS,
        capacity: int = SENT_CAPACITY,
    ) -> None:
        self.block_chars = block_chars
        self.max_chars = max_chars
        self.resend_secs = resend_secs
        self.capacity = capacity
        self._sent: OrderedDict[int, float] = OrderedDict()  # chain digest -> when sent

    def encode(self, model: str, text: str, now: float) -> tuple[int, list[str]]:
        """(base digest, new blocks) for ``text``'s leading whole blocks."""
        size = self.block_chars
        whole = min(len(text), self.max_chars) // size * size
        blocks = [text[at : at + size] for at in range(0, whole, size)]
        digests = []
        digest = root(model)
        for block in blocks:
            digest = _digest(digest, block)
            digests.append(digest)
        sent = self._sent
        fresh_after = now - self.resend_secs
        known = 0  # how many leading blocks the peers hold
        for index in range(len(digests) - 1, -1, -1):
            stamp = sent.get(digests[index])
            if stamp is not None and stamp >= fresh_after:
                known = index + 1
                break
        for digest in digests[known:]:
            sent[digest] = now
            sent.move_to_end(digest)
        if known:
            sent.move_to_end(digests[known - 1])
        while len(sent) > self.capacity:
            sent.popitem(last=False)
        base = digests[known - 1] if known else 0
        return base, blocks[known:]


class PrefixDecoder:
    """The receiver's side: blocks by chain digest, to turn a decision back into text."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, tuple[int, str]] = OrderedDict()  # digest -> (parent, text)

    def decode(self, model: str, base: int, blocks: list[str]) -> str | None:
        """The prefix text, or None when ``base`` names blocks this side does not hold."""
        start = root(model)
        store = self._blocks
        parts: list[str] = []
        digest = base
        if base:
            while digest != start:
                entry = store.get(digest)
                if entry is None:
                    return None
                store.move_to_end(digest)
                digest, text = entry
                parts.append(text)
            parts.reverse()
        parent = base or start
        for block in blocks:
            digest = _digest(parent, block)
            store[digest] = (parent, block)
            store.move_to_end(digest)
            parent = digest
        while len(store) > self.capacity:
            store.popitem(last=False)
        parts.extend(blocks)
        return "".join(parts)
