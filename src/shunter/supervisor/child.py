"""The child's side of ``--workers N``: exit with the supervisor, tag the log lines.

A child must not outlive its supervisor: an orphan would keep serving on the shared port
with nobody to restart it, stop it or read its metrics. On Linux the kernel sends the child
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and SIGTERM is the gateway's drain: an
orphan finishes what it has in flight, then exits. A parent that died before the child
asked is seen at once (the child's parent is no longer the supervisor).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("shunter.supervisor")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOG_FIELD = "gateway_process"  # each log line of a child says which slot wrote it


class _SlotTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, LOG_FIELD, self.index)
        return True


def become_child(index: int, supervisor_pid: int | None) -> None:
    """Set this process up as the supervisor's child ``index``: its log lines carry the
    slot, and it receives SIGTERM when the supervisor dies (exits now if it already has)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_SlotTag(index))
    if supervisor_pid is None:
        return
    if not exit_with_parent():
        log.warning("cannot follow the supervisor's death on this platform")
    if os.getppid() != supervisor_pid:
        log.error("the supervisor is gone; exiting", extra={"supervisor_pid": supervisor_pid})
        sys.exit(1)


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for ``sig`` when the parent dies; False where that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
