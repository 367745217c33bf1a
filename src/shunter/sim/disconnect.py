"""Cancelling a simulated request whose client left, under uvicorn.

uvicorn's ``send`` silently drops writes to a closed connection, so a handler that only
writes would never learn that its client left. After the request body has been read,
``receive()`` returns only when the connection is lost or the response completes; this
watch waits on it and cancels the owning task in the first case, so the sim's engine stops
generating (and counts an abort) as soon as the client goes, as a real engine does.
(The gateway's own server cancels a request whose client left by itself.)
"""

from __future__ import annotations

import asyncio

from shunter.wire.asgi import Receive


class DisconnectWatch:
    """Cancels the current task when the client disconnects."""

    __slots__ = ("_finished", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._finished = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self._finished:
            self.disconnected = True
            self._task.cancel()

    def finish(self) -> None:
        """Mark the response complete: a later disconnect is then no reason to cancel."""
        self._finished = True
        self._watcher.cancel()

    def absorb_cancel(self) -> bool:
        """After catching CancelledError: True when the watch caused it (client left).

        In that case the cancellation is consumed so the task can finish cleanly.
        """
        if self.disconnected:
            self._task.uncancel()
            return True
        return False
