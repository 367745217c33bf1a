"""The two legs of one prefill/decode attempt, run at once, and what ends them.

Both requests go out together (a prefill worker may hold its answer until its decode
worker has connected: sequential dispatch would deadlock) and the first leg to settle
decides:

- the prefill answers an error status, or gives no answer: the decode leg is cancelled at
  once and the attempt has failed on the prefill. No one waits for the decode worker's
  bootstrap timeout (300 s in SGLang), as sglang-router did (sglang #9726, #24159);
- the decode answers an error status, or gives no answer: the prefill leg is cancelled;
- the decode's answer is there (a whole body, or a stream's first chunk): the attempt has
  succeeded, and a prefill still running finishes in the background (the decode worker
  has its cache). A prefill that answered first is waited on only this far: a stream is
  handed back once its first chunk is in, so a prefill error cannot come after the status.

Logprobs change one thing: the decode's answer needs the prefill's, so the prefill is
waited for.

Each leg counts as in flight on its worker for as long as it runs: the prefill until its
answer is read, the decode until its stream ends (the router's relay finishes it). A client
that leaves cancels both, the prefill first: the decode is cancelled only once the prefill
has finished or the decode has produced its first chunk, so a KV transfer in progress is
never cut from the receiving end (smg's rule for gRPC, #2114, here for both transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shunter.backends.base import Outbound
from shunter.fleet.worker import Worker
from shunter.protocols.reply import Reply
from shunter.wire.base import UpstreamError

log = logging.getLogger("shunter.router.pd")

# Abandoned legs still finishing (a prefill behind its decode, a deferred cancellation):
# a reference keeps their tasks from being collected mid-flight.
_background: set[asyncio.Task[Any]] = set()


def in_background(task: asyncio.Task[Any]) -> None:
    _background.add(task)
    task.add_done_callback(_background.discard)


@dataclass(slots=True)
class PrefillAnswer:
    """How a prefill leg ended: its status and body, or the error that gave no answer."""

    status: int = 0
    body: bytes = b""
    error: UpstreamError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


@dataclass(slots=True)
class DecodeAnswer:
    """A decode leg's reply as far as it was read: a stream's first chunk is ``first``
    (None: it ended at once)."""

    reply: Reply
    first: bytes | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.reply.status < 300


@dataclass(slots=True)
class Settled:
    """How the race ended. ``prefill`` None: it is still running (in the background);
    ``decode`` None with ``decode_error`` None: the decode was cancelled (the prefill
    failed)."""

    prefill: PrefillAnswer | None
    decode: DecodeAnswer | None = None
    decode_error: UpstreamError | None = None


async def prefill_leg(worker: Worker, outbound: Outbound, keep_body: bool) -> PrefillAnswer:
    """Send the prefill and read its whole answer (a stream drained; its chunks kept only
    when ``keep_body`` or the status is an error). Never raises but for cancellation."""
    started = time.perf_counter()
    state = worker.state
    state.started()
    try:
        reply = await worker.backend.send(worker, outbound)
        body = reply.body
        if not isinstance(body, bytes):
            keep = keep_body or not 200 <= reply.status < 300
            parts: list[bytes] = []
            try:
                async for chunk in body:
                    if keep:
                        parts.append(chunk)
            finally:
                await body.aclose()
            body = b"".join(parts)
        return PrefillAnswer(reply.status, body, None, time.perf_counter() - started)
    except UpstreamError as exc:
        return PrefillAnswer(0, b"", exc, time.perf_counter() - started)
    finally:
        state.finished()


async def decode_leg(worker: Worker, outbound: Outbound) -> DecodeAnswer:
    """Send the decode and, for a successful stream, wait for its first chunk."""
    reply = await worker.backend.send(worker, outbound)
    body = reply.body
    if isinstance(body, bytes) or not 200 <= reply.status < 300:
        return DecodeAnswer(reply)
    try:
        first = await anext(body, None)
    except BaseException:
        await body.aclose()
        raise
    return DecodeAnswer(reply, first)


class Legs:
    """One attempt's two legs, from dispatch until one of them decides.

    The decode worker is counted in flight from dispatch. Until ``race`` hands its answer
    back, finishing it is this object's job (exactly once: ``_release``); after, the
    router's (its relay, or its error path)."""

    def __init__(self, prefill: Worker, decode: Worker) -> None:
        self.prefill = prefill
        self.decode = decode
        self._prefill_task: asyncio.Task[PrefillAnswer] | None = None
        self._decode_task: asyncio.Task[DecodeAnswer] | None = None
        self._holds_decode = False

    async def race(
        self,
        prefill_out: Outbound,
        decode_out: Outbound,
        needs_prefill: bool,
        on_late_prefill: Callable[[PrefillAnswer], None],
    ) -> Settled:
        """Run both legs until the attempt is decided (see the module docstring).
        ``on_late_prefill`` hears of a prefill that ends after the decision."""
        loop = asyncio.get_running_loop()
        prefill_task = self._prefill_task = loop.create_task(
            prefill_leg(self.prefill, prefill_out, needs_prefill)
        )
        self.decode.state.started()
        self._holds_decode = True
        decode_task = self._decode_task = loop.create_task(decode_leg(self.decode, decode_out))
        try:
            await asyncio.wait((prefill_task, decode_task), return_when=asyncio.FIRST_COMPLETED)
            if prefill_task.done():
                prefill = prefill_task.result()
                if not prefill.ok:
                    await self._cancel_decode()
                    return Settled(prefill)
                await asyncio.wait((decode_task,))
                return self._handed_back(prefill)
            settled = self._handed_back(None)
            if settled.decode is None or not settled.decode.ok:
                prefill_task.cancel()
            elif needs_prefill:
                settled.prefill = await prefill_task
            else:
                prefill_task.add_done_callback(lambda task: _late(task, on_late_prefill))
                in_background(prefill_task)
            return settled
        except BaseException:  # the client left (or the gateway is stopping)
            self.abandon()
            raise

    def _handed_back(self, prefill: PrefillAnswer | None) -> Settled:
        """The decode leg's outcome (its task is done), now the router's to finish."""
        task = self._decode_task
        assert task is not None and task.done()
        try:
            answer = task.result()
        except UpstreamError as exc:
            self._release_now()
            return Settled(prefill, None, exc)
        self._holds_decode = False
        return Settled(prefill, answer)

    def _release_now(self) -> None:
        if self._holds_decode:
            self._holds_decode = False
            self.decode.state.finished()

    async def _cancel_decode(self) -> None:
        """Cancel the decode leg now (its prefill failed) and release what it holds."""
        task = self._decode_task
        assert task is not None
        task.cancel()
        answer: DecodeAnswer | None = None
        with contextlib.suppress(asyncio.CancelledError, UpstreamError):
            answer = await task
        await self._release(answer)

    async def _release(self, answer: DecodeAnswer | None) -> None:
        """A decode leg that will not be relayed: close its stream, stop counting it."""
        if answer is not None and not isinstance(answer.reply.body, bytes):
            await answer.reply.body.aclose()
        self._release_now()

    def abandon(self) -> None:
        """Stop both legs: the prefill now, the decode once the prefill has finished or the
        decode has its first chunk. Runs in the background: the caller is being cancelled."""
        prefill, decode = self._prefill_task, self._decode_task
        if prefill is None or decode is None:
            return
        prefill.cancel()
        if not self._holds_decode:  # already handed back, or released
            return

        async def cancel_decode() -> None:
            await asyncio.wait((prefill, decode), return_when=asyncio.FIRST_COMPLETED)
            if not prefill.done():  # the decode has its first chunk: the transfer is over
                await asyncio.wait((prefill,))
            decode.cancel()
            answer: DecodeAnswer | None = None
            with contextlib.suppress(BaseException):
                answer = await decode
            await self._release(answer)

        in_background(asyncio.get_running_loop().create_task(cancel_decode()))


def _late(task: asyncio.Task[PrefillAnswer], report: Callable[[PrefillAnswer], None]) -> None:
    if not task.cancelled():
        report(task.result())
