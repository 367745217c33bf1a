"""A ``--workers`` child's private Unix socket: the questions its supervisor and its
siblings ask it.

The asker writes one line naming the question; the child writes the answer whole and
closes. Two questions:

- ``metrics``: the child's Prometheus exposition. The supervisor merges every child's
  into the one ``/metrics`` it serves (observability/merged.py).
- ``workers``: the child's own view of each worker as a JSON list (its in-flight count,
  what it served, its breaker). The process that answers ``GET /workers`` asks its
  siblings and merges (siblings.py), so the answer is the whole gateway's whichever
  process the client's connection landed on.

A socket file, not a port: nothing to race for, nothing reachable from the network, and
the directory holding it is the supervisor's private one (mode 0700).

The server runs on the child's event loop, so ``workers`` reads the fleet on the thread
that changes it; the exposition is built in a worker thread (prometheus-client's
collectors are written for that), so a scrape never holds the loop up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("shunter.supervisor")

METRICS = b"metrics"
WORKERS = b"workers"
QUESTION_TIMEOUT_SECS = 2.0  # an asker that connects and says nothing is dropped then
_LONGEST_QUESTION = 64


class ControlSocket:
    """Answers ``questions`` on the Unix socket ``path``.

    ``questions`` maps a question to what answers it and whether that runs in a thread
    (True: slow and thread-safe, like an exposition) or on the loop (False: reads state
    that only the loop may touch).
    """

    def __init__(self, path: str, questions: Mapping[bytes, tuple[Callable[[], bytes], bool]]):
        self.path = path
        self.questions = questions
        self._serving: asyncio.Task[asyncio.Server] | None = None

    def start(self) -> None:
        """Listen now (a failure is the caller's, at once); serve from the running loop."""
        if os.path.exists(self.path):
            os.unlink(self.path)  # left by this slot's previous process
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(64)  # an asker connecting before the loop serves waits in the queue
        except OSError:
            sock.close()
            raise
        self._serving = asyncio.get_running_loop().create_task(
            asyncio.start_unix_server(self._answer, sock=sock)
        )
        log.info("control socket listening", extra={"path": self.path})

    async def close(self) -> None:
        if self._serving is not None:
            server = await self._serving
            server.close()
            await server.wait_closed()
            self._serving = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = b""
        try:
            async with asyncio.timeout(QUESTION_TIMEOUT_SECS):
                line = await reader.readline()
            question = line[:_LONGEST_QUESTION].strip()
            known = self.questions.get(question)
            if known is None:
                log.warning("unknown question on the control socket", extra={"question": line})
                return
            answer, in_thread = known
            writer.write(await asyncio.to_thread(answer) if in_thread else answer())
            await writer.drain()
        except (TimeoutError, OSError):
            pass  # the asker gave up or went away: nobody to tell
        except Exception:  # a bug in an answer: the asker gets nothing, the child lives on
            log.exception("a control socket answer failed", extra={"question": line})
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
