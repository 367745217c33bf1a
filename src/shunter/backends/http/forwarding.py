"""Which of a client's request headers an HTTP worker receives: an allow-list.

A header reaches the worker only if it is named here or with ``--forward-headers``; any
other (cookies, ``x-api-key``, ``proxy-authorization``, a browser's ``user-agent``, whatever a
client or a proxy in front added) stays at the gateway. A deny-list forwarded everything
nobody had thought of, credentials included.

Allowed by default: what a worker needs to read the body and answer in the right form
(``content-type``, ``accept``), the client's credential for a worker that checks it
(``authorization``: a worker with a key of its own gets that key instead), and what lets a
request be followed across services (``x-correlation-id``, ``x-request-id-*``, W3C
``traceparent`` / ``tracestate``, ``x-smg-routing-key``). ``x-request-id`` is not copied:
the worker receives exactly one, the gateway's (which is the client's own when it was plain,
``api/middleware.py``). With tracing on, the gateway's trace context replaces the client's.

The sets are built once, at start, as lowercase bytes (the server hands header names over
lowercased): per header the check is one set lookup, plus one ``startswith`` for
``x-request-id-*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from shunter.wire.base import HOP_BY_HOP

DEFAULT_FORWARDED = frozenset(
    {
        b"authorization",
        b"x-correlation-id",
        b"traceparent",
        b"tracestate",
        b"x-smg-routing-key",
        b"content-type",
        b"accept",
    }
)
REQUEST_ID_PREFIX = b"x-request-id-"  # x-request-id-<anything>: allowed by default
# The Connection values that name no other header (most clients send one of them).
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_TRACE = frozenset({b"traceparent", b"tracestate"})
# Never forwarded, even when named: the connection's own headers (the gateway's client
# writes host and content-length itself), the client's cookies, Expect (the gateway answered
# any 100-continue; the worker gets the whole body) and Origin (CORS is the gateway's to
# answer: a worker that sees one answers it too). proxy-authorization is hop-by-hop.
REFUSED = HOP_BY_HOP | {b"cookie", b"expect", b"origin"}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ForwardRule:
    """The headers forwarded to HTTP workers: the defaults plus ``extra`` (the names given
    with ``--forward-headers``, any case). Raises ValueError for a name that is not an HTTP
    token or that is never forwarded (``REFUSED``)."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        names = set(DEFAULT_FORWARDED)
        for given in extra:
            name = given.strip().lower()
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"--forward-headers {given!r}: not a header name")
            encoded = name.encode("ascii")
            if encoded in REFUSED:
                raise ValueError(
                    f"--forward-headers {name}: never forwarded to workers (the connection's "
                    "own headers, cookie, expect and origin stay at the gateway)"
                )
            names.add(encoded)
        names.discard(b"x-request-id")  # always sent: the gateway's, never a second one
        allowed = frozenset(names)
        # The four sets a request may need, chosen with one index: ``sets[(the worker has
        # a key) + 2 * (the gateway sends no trace context)]``. The worker's own key
        # replaces the client's Authorization, the gateway's trace context the client's.
        self.sets = (
            allowed - _TRACE,
            allowed - _TRACE - {b"authorization"},
            allowed,
            allowed - {b"authorization"},
        )


DEFAULT_RULE = ForwardRule()
