"""The gateway's ASGI application: routing table and the middleware around every handler.

Per request, in order: request id, CORS, route lookup (404/405), API key, handler, error
envelope, metrics. No framework: each step is a few lines here.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from random import getrandbits as _random_bits

from shunter.asgi import BodyTooLarge, ClientGone, Message, Receive, Scope, Send
from shunter.config import GatewayConfig
from shunter.protocols.errors import ApiError
from shunter.routing.router import Inbound
from shunter.server.admin import AdminHandlers
from shunter.server.call import Call
from shunter.server.cors import Cors
from shunter.server.dashboard import Dashboard
from shunter.server.state import GatewayState

log = logging.getLogger("shunter.server")
# One line per request, at INFO: method, path, status, latency, worker, request id. Never
# headers or bodies, so no API key or Authorization value can reach the log.
access_log = logging.getLogger("shunter.access")

Handler = Callable[[Call], Awaitable[int]]
INFERENCE_PATHS = (
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
)
# A client's request id is taken only when it is short and plain: it is echoed in a header,
# written to the log and sent to workers, so anything else gets a fresh id.
_PLAIN_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}").fullmatch
_CROSS_ORIGIN = (
    "admin routes refuse requests from other sites' pages; "
    "list the origin in --cors-allowed-origins to allow it"
)


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    protected: bool  # needs the API key when one is set
    admin: bool = False  # no CORS unless configured; cross-origin browser requests refused


def _id_prefix(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chatcmpl-"
    if path.endswith("/completions"):
        return "cmpl-"
    if path == "/generate":
        return "gnt-"
    if "/responses" in path:
        return "resp-"
    return "req-"


def _with_head(methods: dict[str, Route]) -> dict[str, Route]:
    """HEAD answers like GET (load balancers probe with it); the server drops the body."""
    get = methods.get("GET")
    return methods if get is None else {**methods, "HEAD": get}


class GatewayApp:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        config: GatewayConfig = state.config
        self.config = config
        self._id_headers = tuple(h.encode() for h in config.request_id_headers)
        self._expected_auth = (
            f"Bearer {config.api_key}".encode() if config.api_key is not None else None
        )
        self.cors = Cors(config.cors_allowed_origins)
        admin = AdminHandlers(state)
        dashboard = Dashboard(config.api_key, self._has_key, admin.dashboard_data)
        # Open: health and the model list. Guarded (with --api-key): inference, and every
        # route that changes state, costs worker work or reveals the fleet. "admin" routes
        # are also closed to other sites' pages (server/cors.py).
        open_, guarded = Route, partial(Route, protected=True)
        admin_open = partial(Route, protected=False, admin=True)
        admin_guarded = partial(Route, protected=True, admin=True)
        table: dict[str, dict[str, Route]] = {
            path: {"POST": guarded(self.inference)} for path in INFERENCE_PATHS
        }
        table.update({
            "/health": {"GET": open_(admin.liveness, False)},
            "/liveness": {"GET": open_(admin.liveness, False)},
            "/readiness": {"GET": open_(admin.readiness, False)},
            "/v1/models": {"GET": open_(admin.models, False)},
            "/health_generate": {"GET": admin_guarded(admin.health_generate)},
            "/get_server_info": {"GET": admin_guarded(admin.server_info)},
            "/get_model_info": {"GET": admin_guarded(admin.model_info)},
            "/engine_metrics": {"GET": admin_guarded(admin.engine_metrics)},
            # The dashboard checks the key itself: it also takes a session cookie.
            "/dashboard": {"GET": admin_open(dashboard.page)},
            "/dashboard/data": {"GET": admin_open(dashboard.data)},
            "/dashboard/login": {"POST": admin_open(dashboard.login)},
            "/get_loads": {"GET": admin_guarded(admin.get_loads)},
            "/flush_cache": {"POST": admin_guarded(admin.flush_cache)},
            "/workers": {"GET": admin_guarded(admin.list_workers),
                         "POST": admin_guarded(admin.add_worker)},
        })  # fmt: skip
        self.routes = {path: _with_head(methods) for path, methods in table.items()}
        worker_route = admin_guarded(admin.worker)
        self.worker_routes = _with_head(
            {"GET": worker_route, "PUT": worker_route, "DELETE": worker_route}
        )

    # --- ASGI entry ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        # One pass over the headers for everything the middleware reads.
        request_id = origin = authorization = host = None
        wanted = self._id_headers
        for name, value in scope["headers"]:
            if name in wanted:
                if request_id is None and _PLAIN_ID(value):
                    request_id = value.decode("ascii")
            elif name == b"origin":
                origin = value
            elif name == b"authorization":
                authorization = value
            elif name == b"host":
                host = value
        if request_id is None:
            request_id = _id_prefix(path) + f"{_random_bits(96):024x}"
        label = path
        methods = self.routes.get(path)
        if methods is None and path.startswith("/workers/"):
            methods, label = self.worker_routes, "/workers/{id}"
        route = None if methods is None else methods.get(method)
        admin = route.admin if route is not None else _any_admin(methods)
        if origin is not None:
            if method == "OPTIONS" and self.cors.is_preflight(scope):
                await self.cors.preflight(origin, scope, send, admin)
                return
            send = self.cors.wrap(origin, send, admin)
        call = Call(scope, receive, send, request_id, self.config.max_payload_size, started)
        error_code = ""
        metrics = self.state.metrics
        metrics.connections_active += 1
        try:
            if methods is None:
                label = "other"
                raise ApiError(404, "not_found", f"no route for {path}")
            if route is None:
                raise _method_not_allowed(method, path, methods)
            if admin and origin is not None and self.cors.refuses(origin, host):
                raise ApiError(403, "cross_origin_refused", _CROSS_ORIGIN)
            if route.protected and self._expected_auth is not None:
                self._authenticate(authorization)
            status = await route.handler(call)
        except ApiError as exc:
            status, error_code = exc.status, exc.code
            if status >= 500:
                log.warning(
                    "request failed",
                    extra={
                        "request_id": request_id,
                        "path": path,
                        "status": status,
                        "error_code": exc.code,
                        "error": exc.message,
                    },
                )
            await exc.send(send, [call.id_header])
        except BodyTooLarge:
            status, error_code = 413, "payload_too_large"
            await ApiError(
                413, error_code, f"request body exceeds {self.config.max_payload_size} bytes"
            ).send(send, [call.id_header, (b"connection", b"close")])
        except ClientGone:
            status, error_code = 499, "client_closed"
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "path": path})
            status, error_code = 500, "internal_error"
            await ApiError(500, error_code, "internal gateway error").send(send, [call.id_header])
        finally:
            metrics.connections_active -= 1
        elapsed = time.perf_counter() - started
        metrics.observe_http(method, label, status, error_code, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %d", method, path, status, extra={
                "status": status, "latency_ms": round(elapsed * 1000, 3),
                "worker": call.worker, "request_id": request_id, "error_code": error_code,
            })  # fmt: skip

    # --- middleware pieces ----------------------------------------------------------------

    def _has_key(self, scope: Scope) -> bool:
        """Whether the request carries the API key as a Bearer header."""
        expected = self._expected_auth
        if expected is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, expected)
        return False

    def _authenticate(self, authorization: bytes | None) -> None:
        expected = self._expected_auth
        assert expected is not None
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise ApiError(401, "unauthorized", "missing or invalid API key")

    # --- inference ------------------------------------------------------------------------

    async def inference(self, call: Call) -> int:
        admission = self.state.admission
        if admission is None:
            return await self._infer(call)
        try:
            await admission.acquire()
        except ApiError as exc:
            self.state.metrics.admission("rejected" if exc.status == 429 else "timed_out")
            raise
        self.state.metrics.admission("allowed")
        try:
            return await self._infer(call)
        finally:
            admission.release()  # when the response (a stream included) ends or the client left

    async def _infer(self, call: Call) -> int:
        scope = call.scope
        body = await call.body()
        request = Inbound(
            call.method,
            call.path,
            scope["query_string"],
            scope["headers"],
            body,
            call.request_id,
            started=call.started,
        )
        try:
            return await self.state.router.route(request, call.send, call.receive)
        finally:
            call.worker = request.worker  # for the access log

    # --- lifespan ---------------------------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def startup(self) -> None:
        config = self.config
        if config.api_key is None and _listens_beyond_loopback(config.host):
            log.warning(
                "listening beyond loopback without --api-key: anyone who can reach this "
                "address can add workers (and so read prompts), flush caches and run "
                "inference; set --api-key, or --host 127.0.0.1",
                extra={"host": config.host},
            )
        if config.prometheus_port:
            self.state.metrics.serve(config.prometheus_host, config.prometheus_port)
        self.state.start()

    async def shutdown(self) -> None:
        await self.state.close()
        self.state.metrics.shutdown()


def _any_admin(methods: dict[str, Route] | None) -> bool:
    """For a request whose method has no route: treat the path as admin if any method is."""
    return methods is not None and any(route.admin for route in methods.values())


def _listens_beyond_loopback(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: assume it resolves beyond this machine


def _method_not_allowed(method: str, path: str, methods: dict[str, Route]) -> ApiError:
    allow = ", ".join(sorted(methods)).encode()
    return ApiError(
        405, "method_not_allowed", f"{method} is not allowed on {path}", [(b"allow", allow)]
    )
