"""The fleet dashboard: one HTML page, the JSON behind it, and how a browser signs in to it.

With ``--api-key`` a browser cannot add an ``Authorization`` header to the address bar, so
the page accepts a session cookie instead. The key is exchanged for it once: through the
sign-in form the page shows (``POST /dashboard/login``, the key in the body, never in a
URL) or, for links and scripts written for smg, ``/dashboard?api_key=<key>``, which is
answered with the cookie and a redirect to the bare ``/dashboard`` so the key does not stay
in the address bar (a browser may still keep that first URL in its history: prefer the
form). The cookie is ``HttpOnly`` (page scripts cannot read it), ``SameSite=Strict`` (no
other site's page can send it) and limited to ``/dashboard``; it holds an expiry and an
HMAC of it keyed by the API key, so any gateway process holding the same key can check it
without shared state, and changing the key signs every browser out.

The pages carry a Content-Security-Policy that allows only their own inline script and
style (by hash) and requests to the gateway itself, refuse to be framed, and turn off
content-type sniffing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

import orjson

from shunter.api.call import Call
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import JSON_CONTENT, Reply
from shunter.wire.asgi import Scope, header_value

SESSION_COOKIE = "shunter_dashboard"
SESSION_SECS = 12 * 3600
_PAGE = files("shunter.observability").joinpath("dashboard.html").read_bytes()


def _content_security_policy(page: bytes) -> bytes:
    """A policy admitting exactly the page's inline ``<script>`` and ``<style>`` blocks."""

    def hashes(tag: bytes) -> bytes:
        blocks = re.findall(b"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
        return b" ".join(
            b"'sha256-%s'" % base64.b64encode(hashlib.sha256(block).digest()) for block in blocks
        )

    return (
        b"default-src 'none'; script-src "
        + (hashes(b"script") or b"'none'")
        + b"; style-src "
        + (hashes(b"style") or b"'none'")
        + b"; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


def _protected_page(page: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"content-security-policy", _content_security_policy(page)),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
    ]


_SIGN_IN = b"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Shunter fleet: sign in</title>
<style>body { font: 14px system-ui, sans-serif; margin: 48px; }</style></head>
<body>
<h1>Shunter fleet</h1>
<p>%s</p>
<form method="post" action="/dashboard/login">
<label>API key <input type="password" name="api_key" autocomplete="current-password"></label>
<button type="submit">Sign in</button>
</form>
</body>
</html>
"""
_PAGE_HEADERS = _protected_page(_PAGE)
_SIGN_IN_HEADERS = _protected_page(_SIGN_IN)


class DashboardSessions:
    """Issues and checks the dashboard's session cookie (see the module docstring)."""

    def __init__(self, api_key: str, clock: Callable[[], float] = time.time) -> None:
        self._key = api_key.encode()
        self._clock = clock

    def _mac(self, expires: int) -> str:
        return hmac.new(self._key, b"dashboard-session:%d" % expires, hashlib.sha256).hexdigest()

    def issue(self, secure: bool) -> bytes:
        """A ``Set-Cookie`` value for a new session."""
        expires = int(self._clock()) + SESSION_SECS
        value = f"{expires}.{self._mac(expires)}"
        attributes = f"; Path=/dashboard; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict"
        return (SESSION_COOKIE + "=" + value + attributes + ("; Secure" if secure else "")).encode()

    def valid(self, scope: Scope) -> bool:
        value = _cookie(scope, SESSION_COOKIE)
        if value is None or "." not in value:
            return False
        expires_text, mac = value.split(".", 1)
        # isdigit() alone accepts digits int() refuses ("²"): ASCII digits only.
        if not (expires_text.isascii() and expires_text.isdigit()):
            return False
        if int(expires_text) < self._clock():
            return False
        return hmac.compare_digest(mac, self._mac(int(expires_text)))

    def key_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._key)


def _cookie(scope: Scope, name: str) -> str | None:
    raw = header_value(scope, b"cookie")
    if raw is None:
        return None
    for part in raw.decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class Dashboard:
    """``GET /dashboard``, ``GET /dashboard/data`` and ``POST /dashboard/login``.

    ``authorized`` tells whether a request carries the API key as a Bearer header; the
    session cookie is checked here. Without ``--api-key`` the dashboard is open.
    """

    def __init__(
        self,
        api_key: str | None,
        authorized: Callable[[Scope], bool],
        data: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.sessions = DashboardSessions(api_key) if api_key is not None else None
        self._authorized = authorized
        self._data = data

    def _signed_in(self, call: Call) -> bool:
        sessions = self.sessions
        return sessions is None or self._authorized(call.scope) or sessions.valid(call.scope)

    async def page(self, call: Call) -> Reply:
        sessions = self.sessions
        query = parse_qs(call.scope["query_string"].decode("latin-1"))
        given = query.get("api_key", [None])[0]
        if sessions is not None and given is not None:
            if not sessions.key_matches(given):
                return _sign_in("That API key is not valid.")
            return _signed_in_redirect(call, sessions)
        if not self._signed_in(call):
            return _sign_in("This gateway needs its API key.")
        return Reply(200, list(_PAGE_HEADERS), _PAGE)

    async def data(self, call: Call) -> Reply:
        if not self._signed_in(call):
            raise ApiError(401, "unauthorized", "missing or invalid API key")
        return Reply(200, [JSON_CONTENT], orjson.dumps(await self._data()))

    async def login(self, call: Call) -> Reply:
        sessions = self.sessions
        if sessions is None:
            return _redirect([])
        form = parse_qs((await call.body()).decode("latin-1"))
        if not sessions.key_matches(form.get("api_key", [""])[0]):
            return _sign_in("That API key is not valid.")
        return _signed_in_redirect(call, sessions)


def _signed_in_redirect(call: Call, sessions: DashboardSessions) -> Reply:
    cookie = sessions.issue(secure=call.scope.get("scheme") == "https")
    return _redirect([(b"set-cookie", cookie)])


def _redirect(headers: list[tuple[bytes, bytes]]) -> Reply:
    # 303: the browser follows with a GET to the bare page, leaving the key behind.
    location = [(b"location", b"/dashboard"), (b"cache-control", b"no-store")]
    return Reply(HTTPStatus.SEE_OTHER, [*location, *headers], b"")


def _sign_in(message: str) -> Reply:
    return Reply(401, list(_SIGN_IN_HEADERS), _SIGN_IN % message.encode())
