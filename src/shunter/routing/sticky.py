"""Sticky sessions on any policy (``--routing-key-override``, alias ``--sticky-sessions``).

A request with a routing key (``X-SMG-Routing-Key``, then the ``--routing-key-headers`` in
the order given: the first present wins) goes to the worker its key was first routed to,
for as long as that worker is available: an agent's or a chat's turns land where their
prefix is cached, whatever the policy would have chosen. The first request of a key goes by
the policy, and its choice is remembered.

While the key's worker is unavailable (unhealthy, its breaker open), the key's requests go
by the policy, and the key keeps its worker: it returns there when the worker is back, its
cache likely still warm. When the worker is removed from the fleet, the key moves: the next
request goes by the policy and its choice is remembered instead. A retry that avoids the
key's worker (it just failed this request) goes by the policy too, keeping the key.

The memory is ``policies/keys.py``'s (as the ``manual`` policy's): at most
``--max-routing-keys`` keys, each forgotten after ``--max-idle-secs`` unused. Keys are per
model (and, with prefill/decode pairs, per leg: one ``StickySessions`` each). A key longer
than ``LONG_KEY_BYTES`` is remembered by its digest, so that a client's long keys do not
grow the memory.

A gateway without the flag has no ``StickySessions``: the router pays one attribute check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from shunter.fleet.registry import WorkerRegistry, Workers
from shunter.policies.base import Decision, Policy, RouteRequest, UrlIndexes
from shunter.policies.keys import DEFAULT_MAX_KEYS, KeyMemory

KEY_HEADER = b"x-smg-routing-key"
LONG_KEY_BYTES = 64
REASON = "sticky"


class StickySessions:
    def __init__(
        self,
        registry: WorkerRegistry,
        key_headers: Sequence[str] = (),
        max_idle_secs: float = 4 * 3600,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.registry = registry
        names = [KEY_HEADER, *(h.lower().encode("latin-1") for h in key_headers)]
        self.key_headers = tuple(dict.fromkeys(names))  # in order of precedence
        self.keys: KeyMemory[str] = KeyMemory(max_idle_secs, max_keys)  # (model, key) -> URL
        self._indexes = UrlIndexes()

    def key_of(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
        """The request's routing key: that of the first of ``key_headers`` it carries."""
        names = self.key_headers
        key, rank = None, len(names)
        for name, value in headers:
            if name in names:
                found = names.index(name)
                if found < rank:
                    key, rank = value, found
                    if not found:
                        break
        return key

    def decide(self, policy: Policy, workers: Workers, request: RouteRequest) -> Decision:
        """The key's worker if it is available, else the policy's choice (remembered when
        the key had no worker, or its worker has left the fleet)."""
        key = self.key_of(request.headers or ())
        if key is None:
            return policy.decide(workers, request)
        if len(key) > LONG_KEY_BYTES:
            key = hashlib.blake2b(key, digest_size=16).digest()
        slot = (request.model, key)
        url = self.keys.get(slot)
        if url is not None:
            worker = self._indexes.of(request.model, workers).get(url)
            if worker is not None and worker.state.available:
                self.keys.put(slot, url)
                return Decision(worker, REASON)
            if worker is not None or self.registry.get_by_url(url) is not None:
                return policy.decide(workers, request)  # back later: the key keeps it
        decision = policy.decide(workers, request)
        if decision.worker is not None:
            self.keys.put(slot, decision.worker.url)
        return decision

    def start(self) -> None:
        self.keys.start()

    async def stop(self) -> None:
        await self.keys.stop()
