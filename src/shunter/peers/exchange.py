"""The exchange: what this gateway tells its peers, and what it does with what they say.

The request path only appends to a bounded queue (``decided``: a length check, an append,
and for the first decision of a batch a timer; a full queue drops the decision and counts
it). Everything else runs off the request path on the event loop: ``flush_secs`` (5 ms)
after the first queued decision, the queue goes out as one batch; a snapshot every
``snapshot_secs`` resends every hand-registered worker and setting (how a peer that was
down catches up); and the peers' batches, read as they arrive, put their decisions into
this gateway's cache-aware trees (and count them as short-lived reservations on the chosen
worker), the leader's moves of prompts between workers into the trees too, and their changes
to workers (additions, replacements, settings, removals: ``manual.py``) into the fleet. Each
Responses API response a gateway relays the creation of goes out too (its id and its worker,
``response_created``), so that any peer sends its ``GET`` or its continuation to that
worker. Nothing on the request path waits for a peer: a
slow, down or partitioned peer only means this gateway routes on the view it has.

Measured (``bench/replicas_bench.py``, 8 sims, 2-core machine): 4 and 8 peered gateways keep
the single gateway's hit rate (0.91, against 0.37 and 0.24 independent), publishing ~1-1.7
KB per routed request; CPU per request rises from ~1.0 to ~1.5 ms (4 gateways) and ~2.8 ms
(8), since every gateway applies every peer's decisions (~0.1-0.2 ms each).

One gateway, the leader (the oldest among those heard from lately), rebalances:
every ``REBALANCE_SECS`` it plans at most one move of a prompt between workers per model
(``policies/rebalance.py``), applies it and sends it out at once. Peered gateways placing
different new prompts at once misplace some (balls into bins); a single planner repairs that
without the gateways ever moving prompts against each other.

A peer is refused (its batches counted and dropped, with a log line when that starts) when
it speaks another protocol version, or serves models none of which this gateway serves
(while either side serves none yet, the peer is taken: gateways start empty).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shunter.aio.periodic import Periodic
from shunter.fleet.fleet import Fleet
from shunter.peers.manual import ManualWorkers
from shunter.peers.messages import (
    Batch,
    Decision,
    Hello,
    ManualWorker,
    MessageError,
    PromptMove,
    StoredResponse,
    WorkerSetting,
    decode,
    encode,
)
from shunter.peers.prefixes import PrefixDecoder, PrefixEncoder
from shunter.peers.reservations import DEFAULT_TTL_SECS, Reservations
from shunter.policies.base import Policy
from shunter.policies.cache_aware import CacheAwarePolicy
from shunter.policies.rebalance import (
    KEY_CHARS,
    MAX_PATH_CHARS,
    REBALANCE_SECS,
    UNIT_CHARS,
    Move,
)

if TYPE_CHECKING:  # the sockets (and ZeroMQ) come from ``connect``, when peering is on
    from shunter.peers.transport import PeerSockets

log = logging.getLogger("shunter.peers")

# One batch per 5 ms at most: a decision reaches peers within ~5 ms plus the network, and at
# 1,000 routed requests a second a batch carries ~5 of them.
FLUSH_SECS = 0.005
SNAPSHOT_SECS = 2.0
QUEUE_LIMIT = 10_000  # decisions waiting for a flush (~10 s of a 1,000 req/s burst)
MAX_DECISIONS_PER_BATCH = 512
MAX_RESPONSES_PER_BATCH = 1024  # ~80 KB
RECENT_RESPONSES = 4096  # ~320 KB, sent once to each peer heard for the first time
RECENT_RESPONSES_SECS = 600.0
TICK_SECS = 0.25  # the longest pause between reservation sweeps and snapshot checks
# A peer counts for the leadership this long after its last batch (a snapshot goes out
# every SNAPSHOT_SECS, so three missed snapshots hand the leadership on).
LEADER_SECS = 3 * SNAPSHOT_SECS
# A plan waits this long after a placement: the same moment's placements by other gateways
# arrive within a flush (a placement goes out on the sender's next loop turn) and the network.
SETTLE_SECS = 0.05
PLAN_COST_FACTOR = 20  # plans take at most ~5% of the leader's loop (``_placement_seen``)
MAX_MOVES_PER_BATCH = 16


@dataclass
class PeerCounters:
    batches_sent: int = 0
    bytes_sent: int = 0
    decisions_sent: int = 0
    queue_full: int = 0  # decisions dropped: the queue was full
    send_refused: int = 0  # batches ZeroMQ would not take
    batches_received: int = 0
    bytes_received: int = 0
    decisions_applied: int = 0
    malformed: int = 0
    wrong_version: int = 0
    refused_models: int = 0
    unresolved_prefix: int = 0  # a decision naming blocks this side never got (or evicted)
    unknown_worker: int = 0  # a decision for a worker this gateway does not have
    moves_sent: int = 0  # prompts this gateway moved, as the leader
    moves_applied: int = 0  # prompts the leader moved, applied here
    moves_refused: int = 0  # moves from a peer that does not lead as this gateway sees it
    workers_merged: int = 0  # peers' specs and removals newer than this gateway's
    settings_merged: int = 0  # peers' settings (PATCH) newer than this gateway's
    responses_sent: int = 0
    responses_learnt: int = 0
    peers: dict[str, list[str]] = field(default_factory=dict)  # node -> its models


def new_node_id() -> str:
    """A gateway's id among its peers, new at every start: its start time (milliseconds,
    12 hex digits) and 4 random bytes. Ids order by age, so the leader (the smallest id
    heard) is the gateway up longest: one just restarted holds an empty tree, and planning
    moves on a view that partial would move prompts the wrong way."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(4).hex()}"


class Exchange:
    def __init__(
        self,
        fleet: Fleet,
        policy_for: Callable[[str], Policy],
        connect: Callable[[], PeerSockets],
        *,
        node: str | None = None,
        flush_secs: float = FLUSH_SECS,
        snapshot_secs: float = SNAPSHOT_SECS,
        queue_limit: int = QUEUE_LIMIT,
        reservation_ttl_secs: float = DEFAULT_TTL_SECS,
        encoder: PrefixEncoder | None = None,
        stored_response: Callable[[str, str], None] | None = None,
    ) -> None:
        self.node = node or new_node_id()
        self.fleet = fleet
        self.policy_for = policy_for
        self.connect = connect
        self.flush_secs = flush_secs
        self.snapshot_secs = snapshot_secs
        self.queue_limit = queue_limit
        self.counters = PeerCounters()
        self.manual = ManualWorkers(self.node, fleet)
        self.reservations = Reservations(reservation_ttl_secs)
        self.encoder = encoder or PrefixEncoder()
        self.decoder = PrefixDecoder()
        self._queue: deque[tuple[str, str, str, bool]] = deque()
        self._workers: list[ManualWorker] = []
        self._settings: list[WorkerSetting] = []
        self._responses: deque[StoredResponse] = deque()
        # The responses created here lately (when, which), sent again to a peer heard for
        # the first time (``_resend_recent_responses``).
        self._recent_responses: deque[tuple[float, StoredResponse]] = deque(maxlen=RECENT_RESPONSES)
        self.stored_response = stored_response  # a peer's (response id, worker URL)
        self._flush_pending = False
        self._urgent_pending = False  # a flush on the loop's next turn (``decided``)
        self._next_snapshot = 0.0
        # Reservations are released within a quarter of their TTL of expiring.
        tick = min(reservation_ttl_secs / 4, TICK_SECS) if reservation_ttl_secs else TICK_SECS
        self._ticker = Periodic("peer exchange", tick, self._tick)
        self._refused: set[str] = set()  # nodes refused, logged once until they change
        self._sockets: PeerSockets | None = None
        self._found: frozenset[str] = frozenset()  # peers found by --router-selector
        self._heard: dict[str, float] = {}  # peer node -> when its last batch came
        self._moves: list[PromptMove] = []
        self._rebalancer = Periodic("prompt rebalancing", REBALANCE_SECS, self.rebalance)
        self._rebalance_due = False  # a plan is set for SETTLE_SECS after a placement
        self._next_plan = 0.0  # no plan before (``_placement_seen``)
        self._started = time.monotonic()

    # --- the request path: an append, nothing else -------------------------------------------

    def decided(self, model: str, text: str, url: str, placed: bool = False) -> None:
        """A cache-aware decision of this gateway (called from ``select``). A ``placed`` one
        (a new prefix put on a worker) goes out on the loop's next turn, not in ``flush_secs``:
        gateways placing different new prompts before they hear of each other pile them onto
        the same small cache (8 peered gateways: up to 5 prompts on one worker and 3 on
        another, requests max/min 1.54-1.60); placements are a few per prompt's life, so
        sending them at once costs little."""
        queue = self._queue
        if len(queue) >= self.queue_limit:
            self.counters.queue_full += 1
            return
        queue.append((model, text, url, placed))
        if placed:
            self._placement_seen()
            if not self._urgent_pending:
                self._urgent_pending = True
                asyncio.get_running_loop().call_soon(self._flush_urgent)
        elif not self._flush_pending:
            self._schedule_flush()

    def response_created(self, response_id: str, url: str) -> None:
        """A Responses API response ``url`` created, learnt by this gateway."""
        responses = self._responses
        if len(responses) >= self.queue_limit:
            self.counters.queue_full += 1
            return
        stored = StoredResponse(response_id, url)
        responses.append(stored)
        self._recent_responses.append((time.monotonic(), stored))
        if not self._flush_pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_pending = True
        asyncio.get_running_loop().call_later(self.flush_secs, self._flush_due)

    # --- the API: workers changed by hand ---------------------------------------------------

    def worker_added(self, url: str, body: dict[str, object], worker_id: str) -> None:
        self._workers.append(self.manual.added(url, body, worker_id))
        if not self._flush_pending:
            self._schedule_flush()

    def worker_replaced(self, url: str, body: dict[str, object], worker_id: str) -> None:
        self._workers.append(self.manual.replaced(url, body, worker_id))
        if not self._flush_pending:
            self._schedule_flush()

    def worker_updated(self, url: str, changes: dict[str, object]) -> None:
        self._settings += self.manual.updated(url, changes)
        if not self._flush_pending:
            self._schedule_flush()

    def worker_removed(self, url: str) -> None:
        self._workers.append(self.manual.removed(url))
        if not self._flush_pending:
            self._schedule_flush()

    # --- peers found at run time (pods) -------------------------------------------------------

    def peers_found(self, endpoints: frozenset[str]) -> None:
        """The other gateways' peer endpoints as found now (``--router-selector``): new ones
        are subscribed to, gone ones dropped. Before ``start`` they are kept for it."""
        self._found = endpoints
        if self._sockets is not None:
            self._connect_found(self._sockets)

    def _connect_found(self, sockets: PeerSockets) -> None:
        added, gone = sockets.set_found(self._found)
        for endpoint in sorted(added):
            log.info("peer found", extra={"peer": endpoint})
        for endpoint in sorted(gone):
            log.info("peer gone", extra={"peer": endpoint})

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._sockets = self.connect()
        self._connect_found(self._sockets)
        self._sockets.listen(self._received)
        self._ticker.start()
        self._rebalancer.start()
        self._tick()  # the first snapshot: peers hear of us at once

    async def close(self) -> None:
        await self._ticker.stop()
        await self._rebalancer.stop()
        self.reservations.release_all()
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None

    # --- sending -----------------------------------------------------------------------------

    def _flush_due(self) -> None:
        self._flush_pending = False
        try:
            self.flush(time.monotonic())
        except Exception:  # never let one bad round stop the exchange
            log.exception("sending to peers failed")

    def _flush_urgent(self) -> None:
        self._urgent_pending = False
        try:
            self.flush(time.monotonic())
        except Exception:
            log.exception("sending to peers failed")

    def _tick(self) -> None:
        """Every ``tick_secs``: release expired reservations; now and then, a snapshot."""
        now = time.monotonic()
        self.reservations.expire(now)
        self.manual.retry_pending()
        for node in [n for n, when in self._heard.items() if when < now - LEADER_SECS]:
            del self._heard[node]  # gone quiet (a restarted peer comes back as a new node)
        if now >= self._next_snapshot:
            self._next_snapshot = now + self.snapshot_secs
            try:
                self.flush(now, snapshot=True)
            except Exception:
                log.exception("sending to peers failed")

    def flush(self, now: float, snapshot: bool = False) -> None:
        """Send what is queued (and, with ``snapshot``, every hand-registered worker and
        setting)."""
        queue = self._queue
        decisions: list[Decision] = []
        encoder = self.encoder
        while queue and len(decisions) < MAX_DECISIONS_PER_BATCH:
            model, text, url, placed = queue.popleft()
            base, blocks = encoder.encode(model, text, now)
            decisions.append(Decision(model, url, base, blocks, placed))
        pending = self._responses
        responses = [pending.popleft() for _ in range(min(len(pending), MAX_RESPONSES_PER_BATCH))]
        if (queue or pending) and not self._flush_pending:
            self._schedule_flush()  # more than a batch's worth: go again soon
        manual = self.manual
        workers = manual.snapshot() if snapshot else self._workers
        settings = manual.settings_snapshot() if snapshot else self._settings
        moves = self._moves
        self._workers, self._settings, self._moves = [], [], []
        if not (decisions or workers or settings or responses or moves or snapshot):
            return
        hello = Hello(self.node, list(self.fleet.registry.models()))
        frames = encode(Batch(hello, decisions, workers, responses, settings, moves))
        sockets = self._sockets
        if sockets is None or not sockets.send(frames):
            self.counters.send_refused += 1
            return
        counters = self.counters
        counters.batches_sent += 1
        counters.bytes_sent += sum(len(f) for f in frames)
        counters.decisions_sent += len(decisions)
        counters.responses_sent += len(responses)
        counters.moves_sent += len(moves)

    # --- receiving ---------------------------------------------------------------------------

    def _received(self, frames: list[bytes]) -> None:
        try:
            self.receive(frames, time.monotonic())
        except Exception:  # a bug on one batch must not stop the receiver
            log.exception("applying a peer's batch failed")

    def receive(self, frames: list[bytes], now: float) -> None:
        counters = self.counters
        try:
            batch = decode(frames)
        except MessageError as exc:
            if exc.version is not None:
                counters.wrong_version += 1
                self._refuse(f"version {exc.version}", str(exc))
            else:
                counters.malformed += 1
                log.debug("malformed peer message", extra={"error": str(exc)})
            return
        hello = batch.hello
        if hello.node == self.node:
            return  # our own, through a --peer-urls that names this gateway too
        counters.batches_received += 1
        counters.bytes_received += sum(len(f) for f in frames)
        ours = set(self.fleet.registry.models())
        if ours and hello.models and ours.isdisjoint(hello.models):
            counters.refused_models += 1
            self._refuse(hello.node, f"it serves {sorted(hello.models)}, we serve {sorted(ours)}")
            return
        if hello.node in self._refused:
            self._refused.discard(hello.node)
            log.info("peer accepted", extra={"node": hello.node})
        if hello.node not in counters.peers:
            self._resend_recent_responses(now)
        counters.peers[hello.node] = hello.models
        self._heard[hello.node] = now
        specs, settings = self.manual.merge(batch.workers, batch.settings)
        counters.workers_merged += specs
        counters.settings_merged += settings
        for decision in batch.decisions:
            self._apply(decision, now)
        if batch.moves:
            self._apply_moves(hello.node, batch.moves, now)
        if self.stored_response is not None:
            for stored in batch.responses:
                self.stored_response(stored.id, stored.worker)
            counters.responses_learnt += len(batch.responses)

    def _apply(self, decision: Decision, now: float) -> None:
        counters = self.counters
        worker = self.fleet.registry.get_by_url(decision.worker)
        if worker is None or decision.model not in worker.model_ids:
            counters.unknown_worker += 1
            return
        if self.reservations.ttl_secs:
            self.reservations.reserve(worker.state, now)
        if decision.placed:
            self._placement_seen()
        prefix = self.decoder.decode(decision.model, decision.base, decision.blocks)
        if prefix is None:
            counters.unresolved_prefix += 1
            return
        counters.decisions_applied += 1
        if prefix:
            policy = self.policy_for(decision.model)
            if isinstance(policy, CacheAwarePolicy):
                policy.insert_remote(decision.model, prefix, decision.worker)

    def _apply_moves(self, node: str, moves: list[PromptMove], now: float) -> None:
        """A peer's moves, applied if that peer leads as this gateway sees it (a gateway
        that does not is refused: two planners would move prompts against each other), at
        most ``MAX_MOVES_PER_BATCH`` of them (the leader sends one per model a plan)."""
        counters = self.counters
        if node != self.leader(now):
            counters.moves_refused += len(moves)
            return
        for move in moves[:MAX_MOVES_PER_BATCH]:
            self._apply_move(move, now)
        counters.moves_refused += max(0, len(moves) - MAX_MOVES_PER_BATCH)

    def _apply_move(self, move: PromptMove, now: float) -> None:
        """One move, checked as the leader makes them: a unit starts at ``UNIT_CHARS`` or
        later (a cut at 0 would hand over everything the source holds), moves between two
        workers, the target serving the model (which also bounds the trees a peer can make
        this gateway create to the models it serves)."""
        if (
            not UNIT_CHARS <= move.cut < len(move.text) <= move.cut + KEY_CHARS
            or move.cut > MAX_PATH_CHARS
            or move.source == move.target
        ):
            self.counters.malformed += 1
            log.debug("malformed prompt move", extra={"cut": move.cut, "chars": len(move.text)})
            return
        target = self.fleet.registry.get_by_url(move.target)
        if target is None or move.model not in target.model_ids:
            self.counters.unknown_worker += 1
            return
        policy = self.policy_for(move.model)
        if isinstance(policy, CacheAwarePolicy):
            moved = Move(move.text, move.cut, move.source, move.target, 0, move.reason)
            policy.apply_move(move.model, moved, now)
            self.counters.moves_applied += 1

    # --- rebalancing: the leader's ----------------------------------------------------------

    def leader(self, now: float) -> str | None:
        """The leader as this gateway sees it: the smallest node id (the oldest gateway)
        among itself and the peers heard from in the last ``LEADER_SECS``. None while this
        gateway, started less than ``SNAPSHOT_SECS`` ago, has heard no peer yet: it may not
        have heard an older one (every peer sends a snapshot every ``SNAPSHOT_SECS``), and
        a view that partial would plan moves the wrong way. A partition may make two leaders
        for a while; each one's moves are sound on their own."""
        lately = now - LEADER_SECS
        heard = [node for node, when in self._heard.items() if when >= lately]
        if not heard and now - self._started < self.snapshot_secs:
            return None
        return min([self.node, *heard])

    def leads(self, now: float) -> bool:
        return self.leader(now) == self.node

    def _placement_seen(self) -> None:
        """A new prefix was placed (here or by a peer), or a move was made: as the leader,
        plan ``SETTLE_SECS`` later, once the placements made at the same moment by other
        gateways have arrived, rather than at the next ``REBALANCE_SECS``. A misplacement
        happens in the first milliseconds of a new prompt; repaired that soon, it costs one
        prefill, not a share of the prompt's requests for the rest of its life. Plans are
        spaced by ``PLAN_COST_FACTOR`` times the last one's scan at least: a tree of 200,000
        leaves takes ~250 ms to scan, so steady placements must not chain scans."""
        now = time.monotonic()
        if self._rebalance_due or not self.leads(now):
            return
        self._rebalance_due = True
        delay = max(SETTLE_SECS, self._next_plan - now)
        asyncio.get_running_loop().call_later(delay, self._rebalancer.wake.set)

    async def rebalance(self) -> None:
        """As the leader, plan and apply one move per cache-aware model, and send them out
        at once (a peer that still decided for the old worker meanwhile is redirected:
        ``CacheAwarePolicy.insert_remote``)."""
        self._rebalance_due = False
        started = time.monotonic()
        if started < self._next_plan or not self.leads(started):
            return
        registry = self.fleet.registry
        for model in registry.models():
            policy = self.policy_for(model)
            if not isinstance(policy, CacheAwarePolicy):
                continue
            move = await policy.rebalance(model, registry.get_by_model(model))
            if move is not None:
                self._moves.append(
                    PromptMove(model, move.source, move.target, move.cut, move.text, move.reason)
                )
        now = time.monotonic()
        self._next_plan = now + PLAN_COST_FACTOR * (now - started)
        if self._moves:
            self.flush(now)
            self._placement_seen()  # another look once this move has settled

    def _resend_recent_responses(self, now: float) -> None:
        """A peer heard for the first time (just started, or it joined late) missed what was
        published before it subscribed (PUB/SUB drops for a subscriber not yet connected:
        ZeroMQ's slow joiner). The responses created here in the last
        ``RECENT_RESPONSES_SECS`` go out again, so that its clients' ``GET`` of a response
        made through this gateway finds it (a ``--workers 2`` test lost one that way when
        its processes started slowly)."""
        since = now - RECENT_RESPONSES_SECS
        again = [stored for made, stored in self._recent_responses if made >= since]
        if not again:
            return
        self._responses.extend(again)
        if not self._flush_pending:
            self._schedule_flush()

    def _refuse(self, node: str, reason: str) -> None:
        if node not in self._refused:
            self._refused.add(node)
            log.warning("peer refused", extra={"node": node, "reason": reason})

    def stats(self) -> dict[str, object]:
        """The counters, and the reservations held now (for the dashboard)."""
        sockets = self._sockets
        return {
            **self.counters.__dict__,
            "reservations": len(self.reservations),
            "workers_rejected": self.manual.rejected,
            "found": [] if sockets is None else sorted(sockets.found),
            # Each peer address's link: connecting, connected, retrying (down: ZeroMQ retries
            # with backoff) or refused (its handshake failed).
            "links": {} if sockets is None else dict(sockets.links),
            # Peers refused at the handshake (another --peer-secret-file, or none).
            "handshake_failures": 0 if sockets is None else sockets.handshake_failures,
        }
