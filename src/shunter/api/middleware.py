"""The steps around every handler, each a small named piece: one pass over the request's
headers, the request id, the API key, the access log.

The header pass is one loop for everything the steps read (measured: cheaper than asking
for each header in turn); the steps are plain functions and objects so that ``app.py``
reads as the list of them.
"""

from __future__ import annotations

import hmac
import logging
import re
from random import getrandbits

from shunter.observability.access_log import AccessLog
from shunter.protocols.errors import ApiError
from shunter.wire.asgi import Scope, header_value

# One line per request, at INFO: method, path, status, latency, worker, request id. Never
# headers or bodies, so no API key or Authorization value can reach the log.
access_log = logging.getLogger("shunter.access")
log_access = AccessLog(access_log).write

# A client's request id is taken only when it is short and plain: it is echoed in a header,
# written to the log and sent to workers, so anything else gets a fresh id.
_PLAIN_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}").fullmatch


class RequestHeaders:
    """What the middleware reads from a request's headers, found in one pass."""

    __slots__ = ("authorization", "host", "origin", "request_id")

    def __init__(self, scope: Scope, id_headers: tuple[bytes, ...]) -> None:
        request_id = origin = authorization = host = None
        for name, value in scope["headers"]:
            if name in id_headers:
                if request_id is None and _PLAIN_ID(value):
                    request_id = value.decode("ascii")
            elif name == b"origin":
                origin = value
            elif name == b"authorization":
                if authorization is None:  # the first one counts (see KeyCheck)
                    authorization = value
            elif name == b"host":
                host = value
        self.request_id: str | None = request_id
        self.origin: bytes | None = origin
        self.authorization: bytes | None = authorization
        self.host: bytes | None = host


def fresh_request_id(path: str) -> str:
    """A new id, prefixed as the endpoint's responses are (``chatcmpl-``, ``cmpl-``, …)."""
    if path.endswith("/chat/completions"):
        prefix = "chatcmpl-"
    elif path.endswith("/completions"):
        prefix = "cmpl-"
    elif path == "/generate":
        prefix = "gnt-"
    elif "/responses" in path:
        prefix = "resp-"
    else:
        prefix = "req-"
    return prefix + f"{getrandbits(96):024x}"


class KeyCheck:
    """The gateway's API key, compared in constant time; no key: everything passes.

    One is built per gateway and every check uses it. A request with several
    ``Authorization`` headers is judged by its first, wherever it is checked (the routes'
    guard and the dashboard's sign-in agree)."""

    def __init__(self, api_key: str | None) -> None:
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    def passes(self, authorization: bytes | None) -> bool:
        expected = self.expected
        if expected is None:
            return True
        return authorization is not None and hmac.compare_digest(authorization, expected)

    def require(self, authorization: bytes | None) -> None:
        if not self.passes(authorization):
            raise ApiError(401, "unauthorized", "missing or invalid API key")

    def carried_by(self, scope: Scope) -> bool:
        """Whether the request's first ``Authorization`` passes (for the dashboard)."""
        return self.passes(header_value(scope, b"authorization"))
