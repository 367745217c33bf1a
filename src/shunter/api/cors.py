"""CORS, as smg does it for the inference API, and closed by default for admin routes.

Inference and public routes: with no origins configured, any origin, method and header is
allowed and every header exposed; with ``--cors-allowed-origins``, only those origins, with
GET/POST/OPTIONS, content-type and authorization, exposing ``x-request-id``. Preflight
answers are cached for an hour.

Admin routes (``/workers``, ``/flush_cache``, the dashboard, the worker-info proxies) get
no CORS at all unless their origin is listed explicitly. CORS alone does not protect them:
a browser sends a "simple" cross-origin POST without asking first and only hides the
answer, so a page an operator opens could still add a worker that then receives every
prompt. So a request to an admin route that carries an ``Origin`` that is neither listed
nor the gateway's own is refused (403) before its handler runs. Browsers always send
``Origin`` on cross-origin requests; tools such as curl send none and are not affected.
"""

from __future__ import annotations

from shunter.wire.asgi import Message, Scope, Send, header_value


class Cors:
    def __init__(self, allowed_origins: list[str]) -> None:
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)
        self.any_origin = not self.allowed

    def _allow_origin(self, origin: bytes, admin: bool) -> bytes | None:
        if self.any_origin and not admin:
            return b"*"
        return origin if origin.decode("latin-1") in self.allowed else None

    def refuses(self, origin: bytes, host: bytes | None) -> bool:
        """Whether an admin request from ``origin`` must be refused: not listed, and not
        the gateway's own origin (the dashboard's page calling its data route)."""
        if origin.decode("latin-1") in self.allowed:
            return False
        return host is None or origin.split(b"://", 1)[-1] != host

    def is_preflight(self, scope: Scope) -> bool:
        return header_value(scope, b"access-control-request-method") is not None

    async def preflight(self, origin: bytes, scope: Scope, send: Send, admin: bool) -> None:
        allowed = self._allow_origin(origin, admin)
        headers: list[tuple[bytes, bytes]] = [(b"content-length", b"0")]
        if allowed is not None:
            if allowed == b"*":
                requested = header_value(scope, b"access-control-request-headers") or b"*"
                methods, allow_headers = b"*", requested
            else:
                methods, allow_headers = b"GET, POST, OPTIONS", b"content-type, authorization"
                headers.append((b"vary", b"origin"))
            headers += [
                (b"access-control-allow-origin", allowed),
                (b"access-control-allow-methods", methods),
                (b"access-control-allow-headers", allow_headers),
                (b"access-control-max-age", b"3600"),
            ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def wrap(self, origin: bytes, send: Send, admin: bool) -> Send:
        """``send`` adding the CORS response headers for a request from ``origin``."""
        allowed = self._allow_origin(origin, admin)
        if allowed is None:
            return send
        wildcard = allowed == b"*"
        expose = b"*" if wildcard else b"x-request-id"

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"access-control-allow-origin", allowed),
                    (b"access-control-expose-headers", expose),
                ]
                if not wildcard:
                    message["headers"].append((b"vary", b"origin"))
            await send(message)

        return send_with_cors
