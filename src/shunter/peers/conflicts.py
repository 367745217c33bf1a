"""Placement conflicts: two gateways that put different new prompts on one worker at once.

Peered gateways hold nearly the same trees, and ``cache_aware`` spreads the new prompts
it places by their hash; but two gateways placing different prompts in the same few
milliseconds, before either hears of the other, can still pick the same worker. Each
prompt then stays where it was put, for the rest of its life: on 8 sims with 32 prompts,
one such collision late in a run leaves a worker 5 prompts and another 3 (requests max/min
1.67, seen at 4 gateways).

So each gateway remembers the placements it made in the last ``WINDOW_SECS``; when a
peer's placement lands on the same worker as one of them (a different prompt: its first
``PROMPT_CHARS`` characters differ), the gateway whose node id is the greater moves its
own prompt to where ``cache_aware`` would place it now, knowing both. Both sides compare
the same two node ids, so exactly one of them moves; the move goes out as a placement
too, so its peers follow it (and, should it collide again, it is repaired the same way).
The moved prompt's first request was served where it was first put: one prefill more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_SECS = 0.5  # a peer's placement arrives within ~1-10 ms; a loaded loop lags more
PROMPT_CHARS = 256  # as the peers' prefix blocks: two prompts differing here are two
MAX_REMEMBERED = 1024  # placements kept (a burst of new prompts is repaired up to this)


@dataclass(frozen=True, slots=True)
class Placement:
    at: float  # monotonic seconds
    model: str
    url: str
    text: str


class Placements:
    """This gateway's recent placements, and which of them a peer's placement conflicts
    with (the ones this gateway must move)."""

    def __init__(self, node: str, window_secs: float = WINDOW_SECS) -> None:
        self.node = node
        self.window_secs = window_secs
        self._recent: deque[Placement] = deque(maxlen=MAX_REMEMBERED)

    def placed(self, model: str, text: str, url: str, now: float) -> None:
        """This gateway put a new prompt on ``url``."""
        self._recent.append(Placement(now, model, url, text))

    def yielding_to(
        self, peer: str, model: str, prefix: str, url: str, now: float
    ) -> list[Placement]:
        """A peer placed ``prefix`` on ``url``: this gateway's recent placements of other
        prompts on that worker, if this gateway is the one to move them (the greater node
        id), taken out of the record (their moves are placements of their own)."""
        recent = self._recent
        while recent and recent[0].at < now - self.window_secs:
            recent.popleft()
        if self.node < peer or not recent:
            return []
        head = prefix[:PROMPT_CHARS]
        moving = [
            p for p in recent if p.url == url and p.model == model and p.text[: len(head)] != head
        ]
        for placement in moving:
            recent.remove(placement)
        return moving
