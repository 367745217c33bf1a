"""The gateway's KV events: one subscriber per worker that publishes, one index, and the
read-only view the precise ``cache_aware`` reads (``tracks``, ``cached_tokens``).

Workers come and go through ``add`` and ``remove`` (the composition root calls them on fleet
changes); a removed worker's subscriber is closed and its blocks dropped. A request is
scored by tokenizing its routing text with the tokenizer the engines use (``tokenize``):
the events carry token ids, so the ids must be the very ones the engine saw. A chat request
is rendered first as its engine renders it (``chat``, ``kv_events/chat.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shunter.kv_events.chat import ChatIds
from shunter.kv_events.index import KvIndex
from shunter.kv_events.units import EngineUnit

if TYPE_CHECKING:  # ZeroMQ is imported by the first subscription (~2.5 MiB otherwise idle)
    import zmq.asyncio

    from shunter.kv_events.subscriber import Subscriber

log = logging.getLogger("shunter.kv_events")

Tokenize = Callable[[str], Sequence[Any]]


class KvEvents:
    def __init__(
        self, tokenize: Tokenize, *, chat: ChatIds | None = None, replay_timeout: float = 2.0
    ) -> None:
        self.index = KvIndex()
        self.subscribers: dict[str, Subscriber] = {}
        self.active = False  # whether any worker publishes: the policy's one check
        self._tokenize = tokenize
        self._chat = chat
        self._replay_timeout = replay_timeout
        self._context: zmq.asyncio.Context | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._last: tuple[str, bytes | None, Sequence[Any]] | None = None  # ``_ids``

    # --- the policy's view ---------------------------------------------------------------

    def tracks(self, url: str) -> bool:
        return url in self.subscribers

    def cached_tokens(
        self, model: str, text: str, chat: bytes | None = None
    ) -> tuple[int, Mapping[str, int]]:
        """The prompt's length in tokens and, per worker with events, how many of its
        leading tokens that worker holds in whole cached blocks. ``chat`` is a chat
        request's body: its rendered prompt is scored rather than ``text`` when it renders."""
        ids = self._ids(text, chat)
        return len(ids), self.index.longest_prefix(model, ids)

    def held_tokens(self, model: str, url: str) -> int:
        """The tokens ``url``'s engine holds for ``model`` in cached blocks."""
        return self.index.held_tokens(model, url)

    def version(self, model: str) -> int:
        """Changes whenever ``units`` would answer differently."""
        index = self.index.models.get(model)
        return -1 if index is None else index.version

    def units(self, model: str, eligible: Collection[str], limit: int) -> list[EngineUnit] | None:
        """``model``'s units as the engines hold them (``kv_events/units.py``), those held
        by a worker in ``eligible``, in key order (every gateway lists them alike, so every
        gateway plans the same moves from the same events); None when there are more than
        ``limit``."""
        index = self.index.models.get(model)
        if index is None:
            return []
        units = index.units
        if len(units) > limit:
            return None
        now = time.time()
        listed = []
        for key in sorted(units.blocks):
            holders = units.holders(key, eligible)
            if holders:
                home = holders[-1]
                tokens = units.blocks[key][home] * index.block_size(home)
                listed.append(EngineUnit(key, tuple(holders), units.demand(key, now), tokens))
        return listed

    def unit_of(self, model: str, text: str, chat: bytes | None = None) -> int | None:
        """The unit of a request's prompt (None: shorter than a block)."""
        index = self.index.models.get(model)
        return None if index is None else index.unit_of(self._ids(text, chat))

    def newest(
        self, model: str, text: str, chat: bytes | None, among: Collection[str]
    ) -> str | None:
        """Of the workers in ``among``, the prompt's unit's home: the one that began holding
        it last (None: none of them holds it)."""
        unit = self.unit_of(model, text, chat)
        return None if unit is None else self.index.models[model].units.newest(unit, among)

    def _ids(self, text: str, chat: bytes | None) -> Sequence[Any]:
        """The token ids the engine sees: a chat rendered as the engine renders it (when it
        renders), else the routing text. The last request's are kept: ``unit_of`` asks again
        for the request ``cached_tokens`` just scored (the same objects), which would cost a
        second rendering and tokenization (~150 us for 2,000 words)."""
        last = self._last
        if last is not None and last[0] is text and last[1] is chat:
            return last[2]
        ids = None if chat is None or self._chat is None else self._chat(chat)
        if ids is None:
            ids = self._tokenize(text)
        self._last = (text, chat, ids)
        return ids

    # --- membership ----------------------------------------------------------------------

    def add(self, url: str, model: str, endpoint: str, replay_endpoint: str | None) -> None:
        """Subscribe to a worker's events (on the running loop); a bad endpoint is logged."""
        if url in self.subscribers:
            return
        import zmq
        import zmq.asyncio

        from shunter.kv_events.subscriber import Subscriber

        if self._context is None:
            self._context = zmq.asyncio.Context()
        subscriber = Subscriber(
            url,
            endpoint,
            self.index.of(model),
            self._context,
            replay_endpoint,
            replay_timeout=self._replay_timeout,
        )
        try:
            subscriber.start()
        except zmq.ZMQError as exc:
            log.error(
                "kv events: cannot subscribe",
                extra={"worker": url, "endpoint": endpoint, "error": str(exc)},
            )
            return
        self.subscribers[url] = subscriber
        self.active = True
        log.info("kv events: subscribed", extra={"worker": url, "endpoint": endpoint})

    def remove(self, url: str) -> None:
        """Stop following a worker and forget its blocks (at once: the close finishes in
        the background)."""
        subscriber = self.subscribers.pop(url, None)
        self.active = bool(self.subscribers)
        if subscriber is None:
            return
        self.index.drop_worker(url)
        task = asyncio.get_running_loop().create_task(subscriber.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for subscriber in list(self.subscribers.values()):
            await subscriber.close()
        self.subscribers.clear()
        self.active = False
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._context is not None:
            self._context.destroy(linger=0)

    def counters(self) -> dict[str, dict[str, int]]:
        """Each worker's subscriber counters, blocks indexed and whether it is connected
        (the dashboard, ``/metrics``). Safe from the metrics exporter's thread: it reads
        a copy of the table and plain ints."""
        return {
            url: vars(s.counters)
            | {"blocks": s.index.blocks_of(url), "connected": int(s.connected)}
            for url, s in self.subscribers.copy().items()
        }


def tokenizer_from(source: str) -> Tokenize:
    """``words``: the sim's (whitespace words, ``tokenizer/words.py``); otherwise a
    tokenizer directory or ``tokenizer.json`` file, encoded with the special tokens the
    model adds (a BOS, for most), as an engine encodes a text prompt."""
    if source == "words":
        from shunter.tokenizer.words import text_ids

        return text_ids
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(source)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    return encode
