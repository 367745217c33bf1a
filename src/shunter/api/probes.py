"""The probes alone, for a listener of their own (``--health-check-port``).

A Kubernetes liveness probe that shares the data port shares its fate: when the data port
is saturated (its connection cap reached, its accept queue full), the probe times out and
the kubelet restarts a gateway that was only busy. On a port of its own, with its own
connection count, the probe reaches the process as long as its event loop runs.

The answers are the data port's own (the same handlers, through the gateway's app: the same
readiness, metrics and access log), so ``/readiness`` answers 503 "draining" here too once
the gateway drains. Any other path is a 404: nothing else is served on this port.
"""

from __future__ import annotations

from shunter.api.reply import write_reply
from shunter.protocols.errors import ApiError, error_reply
from shunter.wire.asgi import Receive, Scope, Send
from shunter.wire.server import App

PROBE_PATHS = frozenset({"/health", "/liveness", "/readiness"})


class ProbeApp:
    def __init__(self, app: App) -> None:
        self.app = app  # the gateway's: it answers the probe paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        missing = ApiError(
            404, "not_found", f"no route for {scope['path']}: this port serves only the probes"
        )
        await write_reply(send, error_reply(missing), [])
