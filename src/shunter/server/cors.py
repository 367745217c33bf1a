"""CORS as smg does it (inventory §9.4).

No origins configured: any origin, method and header is allowed and every header exposed.
Configured origins: only those, with GET/POST/OPTIONS, content-type and authorization,
exposing ``x-request-id``. Preflight answers are cached for an hour.
"""

from __future__ import annotations

from shunter.asgi import Message, Scope, Send, header_value


class Cors:
    def __init__(self, allowed_origins: list[str]) -> None:
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)
        self.any_origin = not self.allowed

    def _allow_origin(self, origin: bytes) -> bytes | None:
        if self.any_origin:
            return b"*"
        return origin if origin.decode("latin-1") in self.allowed else None

    def is_preflight(self, scope: Scope) -> bool:
        return header_value(scope, b"access-control-request-method") is not None

    async def preflight(self, origin: bytes, scope: Scope, send: Send) -> None:
        allowed = self._allow_origin(origin)
        headers: list[tuple[bytes, bytes]] = [(b"content-length", b"0")]
        if allowed is not None:
            if self.any_origin:
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

    def wrap(self, origin: bytes, send: Send) -> Send:
        """``send`` adding the CORS response headers for a request from ``origin``."""
        allowed = self._allow_origin(origin)
        if allowed is None:
            return send
        expose = b"*" if self.any_origin else b"x-request-id"

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"access-control-allow-origin", allowed),
                    (b"access-control-expose-headers", expose),
                ]
                if not self.any_origin:
                    message["headers"].append((b"vary", b"origin"))
            await send(message)

        return send_with_cors
