"""The access log: a line per request, for a fixed set of fields, built in one f-string.

The line is the text ``TextFormatter`` gives a record of the message ``"{method} {path}
{status}"`` with the fields status, latency_ms, worker, request_id and error_code, in that
order (``test_access_log.py`` holds the two to each other). ``InfoLines`` built it from a
field dict, joined and escape-scanned whole; a line here skips the dict and the join, takes
the latency's digits from one float formatting rather than two (``round``'s and ``repr``'s)
and scans for characters to escape only the request's part, not the time stamp and logger
name. Measured with callgrind: 44.6k → 28.9k user-space instructions a line in process (to a
pipe), 348.5k → 332.7k per proxied request (``bench/instructions_bench.py``).

The text lines of one event-loop turn are written together at its end, one write per
handler: a write system call per request was ~3% of the gateway's time (py-spy), and under
load a turn finishes several requests. ``proxy_bench.py`` against the commit before, two runs:
CPU per request 60.4 -> 58.4 and 59.6 -> 58.0 us at 32 connections, 130.3 -> 124.4 us at
one; with the gateway, wrk and the worker all on one core (one request a turn, and the write
now costs a loop iteration of its own) 72.5 -> 76.9 us and 3 us more added p50. A line is
written within the turn that finished its request, so nothing waits on it; a crash loses at
most that turn's lines.

Any other set-up (JSON lines, a capture, a filter, ``--log-dir``'s rotating file, a
formatter of the user's own) goes through ``InfoLines``, which writes JSON lines directly
and hands everything else a ``LogRecord``.

What stays per line: the walk up the loggers to their handlers (``plain_handlers``, ~5k),
since ``logging`` says nothing when a handler or filter is added; a cached answer checked
against a snapshot of what decided it cost more (~10k) than the walk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shunter.observability.logging import ESCAPES, InfoLines, TextFormatter, plain_handlers


class AccessLog:
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._lines = InfoLines(logger)
        self._level_and_name = f"INFO {logger.name}: ".translate(ESCAPES)
        # Lines of this event-loop turn, written together at its end (``_write_pending``):
        # one write system call per turn rather than per request. Each: (handlers, when,
        # the line's request part, method, path, status).
        self._pending: list[tuple[list[logging.StreamHandler[Any]], float, str, str, str, int]] = []

    def write(
        self,
        method: str,
        path: str,
        status: int,
        seconds: float,
        worker: str | None,
        request_id: str,
        error_code: str,
    ) -> None:
        """One request's line: ``worker`` the URL that answered (None: none did),
        ``error_code`` the gateway's error code ('' for none)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO) or logger.disabled:
            return
        handlers = plain_handlers(logger)
        if handlers is not None:
            for handler in handlers:
                if type(handler.formatter) is not TextFormatter:
                    break
            else:  # every one formats text: the line's request part, as TextFormatter's
                # ``repr(round(ms, 3))``'s digits ("1.230" -> "1.23", "2.000" -> "2.0") for
                # any latency under 1e16 ms, where repr would turn to an exponent.
                ms = f"{seconds * 1000:.3f}".rstrip("0")
                if ms[-1] == ".":
                    ms += "0"
                request = (
                    f"{method} {path} {status} status={status} latency_ms={ms} worker={worker} "
                    f"request_id={request_id} error_code={error_code}"
                )
                if not request.isprintable() or "\\" in request:  # see ``TextFormatter.line``
                    request = request.translate(ESCAPES)
                self._queue(handlers, request, method, path, status)
                return
        self._lines.write_to(
            handlers,
            f"{method} {path} {status}",
            {
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
                "worker": worker,
                "request_id": request_id,
                "error_code": error_code,
            },
        )

    def _queue(
        self,
        handlers: list[logging.StreamHandler[Any]],
        request: str,
        method: str,
        path: str,
        status: int,
    ) -> None:
        """A text line for ``handlers`` (``request``: its request part), written with the
        rest of this loop turn's; method, path and status name it if the write fails."""
        pending = self._pending
        pending.append((handlers, time.time(), request, method, path, status))
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._write_pending)
            except RuntimeError:  # no event loop (a tool, a test): write it now
                self._write_pending()

    def _write_pending(self) -> None:
        """The lines of this loop turn, one write per handler (``_pending``)."""
        pending, self._pending = self._pending, []
        by_handler: dict[logging.StreamHandler[Any], list[str]] = {}
        for handlers, created, request, _, _, _ in pending:
            for handler in handlers:
                formatter: TextFormatter = handler.formatter  # type: ignore[assignment]
                stamp = formatter.asctime(created)
                line = f"{stamp} {self._level_and_name}{request}{handler.terminator}"
                by_handler.setdefault(handler, []).append(line)
        for handler, lines in by_handler.items():
            try:
                with handler.lock:  # type: ignore[union-attr]
                    stream = handler.stream
                    stream.write("".join(lines))
                    stream.flush()  # as ``handler.flush()``, less taking the lock again
            except Exception:
                _, _, _, method, path, status = pending[0]
                message = f"{method} {path} {status}"
                logger = self.logger
                record = logger.makeRecord(logger.name, logging.INFO, "", 0, message, (), None)
                handler.handleError(record)
