"""Slot turns: requests for one prompt take turns on a llama.cpp worker instead of evicting.

llama.cpp's server keeps a prompt's KV cache in the slot that ran it, one prompt per slot
(with its host-RAM prompt cache off, as a GPU's memory is bounded). A request goes to the
idle slot sharing the longest prefix with it; a slot that is busy cannot lend its cache.
So when two requests for one system prompt run on a worker at once, the second prefills
the whole prompt again in another slot and evicts whatever that slot held: measured on
SmolLM2 with four slots, a second concurrent request of a 303-token prompt found 0 tokens
cached where the same request after the first found 295. With as many prompts as slots,
each such overlap costs a full prefill now and another later, for the prompt it evicted.
No placement avoids it: a model of two 4-slot workers under the affinity benchmark's
workload (``bench/affinity_bench.py``) processed as many prompt tokens with a static
prompt-to-worker assignment as with ``cache_aware`` (6,244 against 6,220 per run, 200
seeds), and sending the overlapping request to the other worker merely moves the eviction.

What saves the work is waiting: the second request waits until the first one's slot is
idle again, then finds its prompt cached. In the same model that cut the prompt tokens
processed by 22% (short run) and 60% (long run). Waiting trades latency for work, which
pays when a prefill costs more than what the running request has left to do (llama.cpp on
CPUs: ~8 ms per prompt token against ~6 ms per generated one for SmolLM2 here) and not on a
GPU, where a prefill of a few hundred tokens takes milliseconds. So turns are opt-in
(``--slot-wait-secs``), and a wait is bounded by it: after that the request goes anyway.

The worker's slots are modelled from the requests this gateway sends it (``_copies``: how
many slots hold each prompt; ``_recent``: prompts by last use, as llama.cpp reuses the
least recently used idle slot). A request waits only when running now would evict a prompt
no other slot holds: its prompt's copies are all busy, every slot holds something, and no
idle slot holds a second copy of another prompt. A prompt new to the worker never waits
(its placement is the policy's call, and it misses wherever it goes); neither does a short
one (``MIN_PROMPT_CHARS``: a prefill of less than ~256 tokens is not worth a wait). Waiters
for one prompt are served in arrival order, and a newcomer queues behind them.

State lives on the event loop and is changed only by ``take`` and ``release``: no lock.
``TurnTakingBackend`` is the llama.cpp worker's ``HttpBackend`` with turns on; other
workers' backends pay nothing for the feature (the router joins a prompt's text for a
backend only when it ``wants_prompt``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from shunter.backends.base import Outbound, Target
from shunter.backends.http.backend import HttpBackend
from shunter.protocols.reply import Reply

log = logging.getLogger("shunter.backends.slots")

# Prompts shorter than this (in characters of routing text, ~4 per token) never wait, and
# the prompt's identity is its first MIN_PROMPT_CHARS characters: requests that share
# those share a system prompt (or a conversation), and llama.cpp gives them the same slot.
MIN_PROMPT_CHARS = 1024


def prompt_key(text: str | None) -> str | None:
    """What identifies a request's prompt to ``SlotTurns``; None: too short to wait for."""
    if text is None or len(text) < MIN_PROMPT_CHARS:
        return None
    return text[:MIN_PROMPT_CHARS]


class SlotTurns:
    """One llama.cpp worker's slots, as this gateway's requests filled them."""

    def __init__(self, slots: int, wait_secs: float) -> None:
        self.slots = slots
        self.wait_secs = wait_secs
        self._copies: dict[str, int] = {}  # prompt -> slots believed to hold it
        self._running: dict[str, int] = {}  # prompt -> requests running now
        self._recent: OrderedDict[str, None] = OrderedDict()  # prompts, least recent first
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self.waits = 0  # requests that waited for their prompt's slot
        self.timeouts = 0  # of those, the ones that went anyway after ``wait_secs``

    async def take(self, key: str) -> None:
        """Return when the request for prompt ``key`` may go to the worker; pair with one
        ``release(key)`` once its answer is over (or it failed)."""
        if self.must_wait(key) and await self._wait(key):
            self._recent.move_to_end(key)  # handed the slot of the request that ended
            return
        self.admit(key)

    def release(self, key: str) -> None:
        """The request for ``key`` is over: its slot goes to the next waiter, if any (so no
        newcomer can take it in between), else it is idle."""
        if self._hand_over(key):
            return
        running = self._running.get(key, 0) - 1
        if running > 0:
            self._running[key] = running
        else:
            self._running.pop(key, None)

    def _hand_over(self, key: str) -> bool:
        waiters = self._waiters.get(key)
        handed = False
        while waiters and not handed:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                handed = True
        if waiters is not None and not waiters:
            del self._waiters[key]
        return handed

    # --- the model ---------------------------------------------------------------------------

    def must_wait(self, key: str) -> bool:
        """Whether a request for ``key`` arriving now waits (``take`` asks; so does the
        model in ``bench/slot_model.py``)."""
        if self._waiters.get(key):
            return True  # first come, first served
        copies = self._copies.get(key, 0)
        if copies == 0 or self._running.get(key, 0) < copies:
            return False  # new here (a miss anyway), or an idle slot holds it
        return sum(self._copies.values()) >= self.slots and self._spare() is None

    def _spare(self) -> str | None:
        """A prompt with a second copy in an idle slot: evicting it loses nothing."""
        running = self._running
        for prompt, copies in self._copies.items():
            if copies >= 2 and copies > running.get(prompt, 0):
                return prompt
        return None

    def admit(self, key: str) -> None:
        """Count a request for ``key`` as sent to the worker, in the slot llama.cpp gives
        it (a copy it holds idle, else a new one, evicting as llama.cpp would)."""
        copies = self._copies.get(key, 0)
        if self._running.get(key, 0) >= copies:  # it takes a slot of its own: a new copy
            while sum(self._copies.values()) >= self.slots and self._evict(key):
                pass
            self._copies[key] = self._copies.get(key, 0) + 1
        self._running[key] = self._running.get(key, 0) + 1
        self._recent[key] = None
        self._recent.move_to_end(key)

    def _evict(self, key: str) -> bool:
        """Forget the copy llama.cpp overwrites: a spare one, else the least recently used
        prompt with an idle slot. False when every slot is busy: llama.cpp then queues the
        request, and the model holds one copy too many until a later admission evicts."""
        victim = self._spare()
        if victim is None:
            copies, running = self._copies, self._running
            idle = (p for p in self._recent if p != key and copies[p] > running.get(p, 0))
            victim = next(idle, None)
        if victim is None:
            return False
        left = self._copies[victim] - 1
        if left:
            self._copies[victim] = left
        else:
            del self._copies[victim]
            del self._recent[victim]
        return True

    async def _wait(self, key: str) -> bool:
        """True when a request for ``key`` ended and handed this one its slot; False when
        ``wait_secs`` passed first (the request goes anyway, to a slot of its own)."""
        self.waits += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, deque()).append(waiter)
        try:
            async with asyncio.timeout(self.wait_secs):
                await waiter
            return True
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return True  # handed a slot just as the time ran out
            self.timeouts += 1
            log.debug("slot wait timed out", extra={"wait_secs": self.wait_secs})
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then its client left
                self.release(key)  # the slot goes on to the next in line
            raise
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]


class TurnTakingBackend(HttpBackend):
    """An ``HttpBackend`` whose requests take their prompt's turn (``SlotTurns``) first."""

    wants_prompt = True

    def __init__(self, turns: SlotTurns, *backend: Any, **options: Any) -> None:
        """``turns``, then what an ``HttpBackend`` takes."""
        super().__init__(*backend, **options)
        self.turns = turns

    async def send(
        self, target: Target, request: Outbound, ended: Callable[[], None] | None = None
    ) -> Reply:
        key = prompt_key(request.prompt)
        if key is None:
            return await super().send(target, request, ended)
        turns = self.turns
        await turns.take(key)

        def release() -> None:
            turns.release(key)
            if ended is not None:
                ended()

        try:
            reply = await super().send(target, request, release)
        except BaseException:
            release()
            raise
        if isinstance(reply.body, bytes):
            release()
        return reply
