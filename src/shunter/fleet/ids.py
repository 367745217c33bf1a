"""Worker ids: the UUID that names a worker in ``/workers/{id}`` and in the
``X-SMG-Routed-Worker-Id`` response header, for as long as the worker is registered.

A worker added through ``POST /workers`` gets a random id there, which travels with it to
the peer gateways and ``--workers`` siblings (``peers/manual.py``), so every process answers
for the same id. A worker given by flag or found by discovery is registered by each process
on its own, so its id is derived from its URL instead, keyed by a secret the processes of one
gateway share (``SHUNTER_WORKER_ID_KEY``, set by the ``--workers`` supervisor for its
children; a process alone draws its own): siblings agree, while a client reading the header
cannot test guesses of a worker's internal address against it, as it could against a hash of
the URL alone. The id stays the same across updates and replacements (``PUT``/``PATCH``).
"""

from __future__ import annotations

import os
import re
import uuid

ROUTED_WORKER_HEADER = b"x-smg-routed-worker-id"
KEY_ENV = "SHUNTER_WORKER_ID_KEY"
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _namespace() -> uuid.UUID:
    key = os.environ.get(KEY_ENV)
    if key:
        try:
            return uuid.UUID(key)
        except ValueError:
            pass
    return uuid.uuid4()


_NAMESPACE = _namespace()


def share_key() -> None:
    """Put this process's key where the processes it starts find it (their environment)."""
    os.environ[KEY_ENV] = str(_NAMESPACE)


def new_worker_id() -> str:
    """A fresh id, for a worker added through the API."""
    return str(uuid.uuid4())


def derived_worker_id(url: str) -> str:
    """The id of a worker given by flag or found by discovery: the same in every process of
    this gateway (see the module docstring)."""
    return str(uuid.uuid5(_NAMESPACE, url))


def parse_worker_id(text: str) -> str | None:
    """``text`` as a worker id in its canonical spelling (lower case, 8-4-4-4-12 hex digits),
    or None when it is not one."""
    lowered = text.lower()
    return lowered if _CANONICAL.fullmatch(lowered) else None


def looks_like_worker_id(text: str) -> bool:
    """Whether ``text`` was meant as an id (hex digits and dashes only), right or wrong:
    a wrong one is a malformed id, not a URL to look up."""
    return bool(text) and all(c in "0123456789abcdefABCDEF-" for c in text)
