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

"The gateway's own origin" is an origin naming the ``Host`` the request was sent to. Without
``--api-key`` that alone is not enough: a page on ``attacker.example:30000`` whose name is
then re-pointed at the gateway's address (DNS rebinding) sends ``Host`` and ``Origin`` that
match each other. So without a key only names that cannot be re-pointed count: loopback
(``localhost``, ``127.0.0.1``, ``[::1]``) and the ``--host`` the gateway listens on; any
other origin must be listed. With a key, the key is what protects the admin routes, and a
matching ``Host`` is enough.
"""

from __future__ import annotations

import ipaddress

from shunter.wire.asgi import Message, Scope, Send, header_value


class Cors:
    def __init__(self, allowed_origins: list[str], own_hosts: frozenset[str] | None = None) -> None:
        """``own_hosts``: the host names a request's own origin may carry (lower-case, IPv6
        in brackets); None: any, as long as it is the ``Host`` (an API key is set)."""
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)
        self.any_origin = not self.allowed
        self.own_hosts = own_hosts

    def _allow_origin(self, origin: bytes, admin: bool) -> bytes | None:
        if self.any_origin and not admin:
            return b"*"
        return origin if origin.decode("latin-1") in self.allowed else None

    def refuses(self, origin: bytes, host: bytes | None) -> bool:
        """Whether an admin request from ``origin`` must be refused: not listed, and not
        the gateway's own origin (the dashboard's page calling its data route)."""
        if origin.decode("latin-1") in self.allowed:
            return False
        if host is None or origin.split(b"://", 1)[-1] != host:
            return True
        return self.own_hosts is not None and not _unmovable(host, self.own_hosts)

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


def own_hosts(listen_host: str) -> frozenset[str]:
    """The names that reach this gateway and that no other site can claim: loopback, and
    the address it listens on."""
    listen = listen_host.lower()
    if ":" in listen:  # an IPv6 address, as a Host header spells it
        listen = f"[{listen}]"
    return frozenset({"localhost", "127.0.0.1", "[::1]", listen})


def _unmovable(host: bytes, names: frozenset[str]) -> bool:
    """Whether ``host`` (a Host header: name and maybe a port) is one of ``names`` or a
    loopback address."""
    text = host.decode("latin-1").lower()
    name = text[: text.index("]") + 1] if text.startswith("[") else text.rsplit(":", 1)[0]
    if name in names:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
