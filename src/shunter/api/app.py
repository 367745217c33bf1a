"""The gateway's ASGI application: the route table, and the steps around every handler.

Per request, in order: one pass over the headers (``middleware.py``), the request id, CORS,
the route (404/405), the admin routes' origin check, the API key, the handler, the error
envelope, writing the reply, metrics and the access log. Handlers return a ``Reply``; this
is the one place that writes to the client. A client that leaves mid-request reaches here
as a cancellation (the server's doing): it is counted as 499 and the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from shunter.api.call import Call
from shunter.api.cors import Cors, own_hosts
from shunter.api.dashboard import Dashboard
from shunter.api.inference import INFERENCE_PATHS, InferenceApi
from shunter.api.info import InfoApi
from shunter.api.middleware import KeyCheck, RequestHeaders, fresh_request_id, log_access
from shunter.api.reply import body_sink, write_reply
from shunter.api.responses import STORED_METHODS, STORED_PREFIX, ResponsesApi, stored_route
from shunter.api.workers import WorkersApi
from shunter.observability.metrics import Metrics
from shunter.protocols import tokenize
from shunter.protocols.anthropic import MESSAGES_PATH, anthropic_error_reply
from shunter.protocols.errors import ApiError, error_reply
from shunter.protocols.reply import Reply
from shunter.routing.responses import RESPONSES_PATH
from shunter.wire.asgi import BodyTooLarge, ClientGone, Receive, Scope, Send

log = logging.getLogger("shunter.api")

Handler = Callable[[Call], Awaitable[Reply]]
_CROSS_ORIGIN = (
    "admin routes refuse requests from other sites' pages; "
    "list the origin in --cors-allowed-origins to allow it"
)


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    protected: bool = False  # needs the API key when one is set
    admin: bool = False  # no CORS unless configured; cross-origin browser requests refused
    errors: Callable[[ApiError], Reply] = error_reply  # the error envelope of its answers


@dataclass(frozen=True)
class AppSettings:
    cors_allowed_origins: tuple[str, ...] = ()
    listen_host: str = "127.0.0.1"  # --host: a name the admin routes' own origin may carry
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    max_payload_size: int = 64 * 1024 * 1024


def _with_head(methods: dict[str, Route]) -> dict[str, Route]:
    """HEAD answers like GET (load balancers probe with it); the server drops the body."""
    get = methods.get("GET")
    return methods if get is None else {**methods, "HEAD": get}


class GatewayApp:
    def __init__(
        self,
        settings: AppSettings,
        keys: KeyCheck,
        metrics: Metrics,
        inference: InferenceApi,
        info: InfoApi,
        workers: WorkersApi,
        dashboard: Dashboard,
        responses: ResponsesApi | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._id_headers = tuple(h.encode() for h in settings.request_id_headers)
        self.keys = keys  # the gateway's one KeyCheck, which the dashboard uses too
        # Without a key, only unmovable names count as the gateway's own (DNS rebinding).
        hosts = own_hosts(settings.listen_host) if keys.expected is None else None
        self.cors = Cors(list(settings.cors_allowed_origins), hosts)
        # Open: health and the model list. Guarded (with --api-key): inference, and every
        # route that changes state, costs worker work or reveals the fleet. Admin routes are
        # also closed to other sites' pages (api/cors.py).
        guarded = partial(Route, protected=True)
        admin = partial(Route, protected=True, admin=True)
        signed_in = partial(Route, admin=True)  # the dashboard checks its key itself
        table: dict[str, dict[str, Route]] = {
            path: {"POST": guarded(inference.handle)} for path in INFERENCE_PATHS
        }
        # Anthropic's Messages API answers its errors in Anthropic's envelope.
        table[MESSAGES_PATH] = {"POST": guarded(inference.handle, errors=anthropic_error_reply)}
        checked = partial(inference.handle, check=tokenize.check)  # a 400 before routing
        table |= {path: {"POST": guarded(checked)} for path in tokenize.TOKEN_PATHS}
        table |= {
            "/health": {"GET": Route(info.liveness)},
            "/liveness": {"GET": Route(info.liveness)},
            "/readiness": {"GET": Route(info.readiness)},
            "/v1/models": {"GET": Route(info.models)},
            "/health_generate": {"GET": admin(info.health_generate)},
            "/get_server_info": {"GET": admin(info.server_info)},
            "/get_model_info": {"GET": admin(info.model_info)},
            "/engine_metrics": {"GET": admin(info.engine_metrics)},
            "/get_loads": {"GET": admin(info.get_loads)},
            "/flush_cache": {"POST": admin(info.flush_cache)},
            "/workers": {"GET": admin(workers.list_workers), "POST": admin(workers.add_worker)},
            "/dashboard": {"GET": signed_in(dashboard.page)},
            "/dashboard/data": {"GET": signed_in(dashboard.data)},
            "/dashboard/login": {"POST": signed_in(dashboard.login)},
        }
        # The Responses API: creation, and the stored responses' routes (by their suffix).
        self.stored_routes: dict[str, dict[str, Route]] = {}
        if responses is not None:
            table[RESPONSES_PATH] = {"POST": guarded(responses.create)}
            self.stored_routes = {
                suffix: {method: guarded(responses.stored) for method in methods}
                for suffix, methods in STORED_METHODS.items()
            }
        self.routes = {path: _with_head(methods) for path, methods in table.items()}
        worker_route = admin(workers.worker)
        self.worker_routes = _with_head(
            {method: worker_route for method in ("GET", "PUT", "PATCH", "DELETE")}
        )

    def _route(self, path: str, method: str) -> tuple[dict[str, Route] | None, Route | None, str]:
        """The path's methods, the route for ``method``, and the metrics label."""
        methods = self.routes.get(path)
        label = path
        if methods is None and path.startswith("/workers/"):
            methods, label = self.worker_routes, "/workers/{id}"
        if methods is None and path.startswith(STORED_PREFIX) and self.stored_routes:
            found = stored_route(path)
            if found is not None:
                methods, label = self.stored_routes[found[1]], STORED_PREFIX + "{id}" + found[1]
        if methods is None:
            return None, None, "other"
        return methods, methods.get(method), label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app. One coroutine, not a type check awaiting a handler: each coroutine
        between the server and the worker's client costs ~1.5k instructions a request."""
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        seen = RequestHeaders(scope, self._id_headers)
        request_id = seen.request_id or fresh_request_id(path)
        methods, route, label = self._route(path, method)
        admin = route.admin if route is not None else _any_admin(methods)
        origin = seen.origin
        if origin is not None:
            if method == "OPTIONS" and self.cors.is_preflight(scope):
                await self.cors.preflight(origin, scope, send, admin)
                return
            send = self.cors.wrap(origin, send, admin)
        call = Call(scope, receive, request_id, self.settings.max_payload_size, started)
        status, error_code = 500, "internal_error"
        metrics = self.metrics
        metrics.connections_active += 1
        try:
            reply = await self._reply(call, methods, route, seen)
            status = reply.status
            error_code = _error_code(reply) if status >= 400 else ""
            extra = [(b"x-request-id", request_id.encode())]
            await write_reply(send, reply, extra, body_sink(scope))
        except ClientGone:
            status, error_code = 499, "client_closed"
        except asyncio.CancelledError:  # the client left; the server cancelled us
            status, error_code = 499, "client_closed"
            raise
        finally:
            metrics.connections_active -= 1
            elapsed = time.perf_counter() - started
            metrics.observe_http(method, label, status, error_code, elapsed)
            log_access(method, path, status, elapsed, call.worker, request_id, error_code)

    async def _reply(
        self,
        call: Call,
        methods: dict[str, Route] | None,
        route: Route | None,
        seen: RequestHeaders,
    ) -> Reply:
        """What the handler answers, or the error envelope of why it was not run or failed."""
        try:
            if methods is None:
                raise ApiError(404, "not_found", f"no route for {call.path}")
            if route is None:
                raise _method_not_allowed(call.method, call.path, methods)
            if (
                route.admin
                and seen.origin is not None
                and self.cors.refuses(seen.origin, seen.host)
            ):
                raise ApiError(403, "cross_origin_refused", _CROSS_ORIGIN)
            if route.protected:
                self.keys.require(seen.authorization)
            return await route.handler(call)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning(
                    "request failed",
                    extra={
                        "request_id": call.request_id,
                        "path": call.path,
                        "status": exc.status,
                        "error_code": exc.code,
                        "error": exc.message,
                    },
                )
            return (route or _NO_ROUTE).errors(exc)
        except BodyTooLarge:
            limit = self.settings.max_payload_size
            too_large = ApiError(
                413,
                "payload_too_large",
                f"request body exceeds {limit} bytes",
                [(b"connection", b"close")],
            )
            return (route or _NO_ROUTE).errors(too_large)
        except (ClientGone, asyncio.CancelledError):
            raise
        except Exception:
            log.exception(
                "unhandled error", extra={"request_id": call.request_id, "path": call.path}
            )
            return error_reply(ApiError(500, "internal_error", "internal gateway error"))


async def _no_handler(call: Call) -> Reply:
    raise ApiError(404, "not_found", f"no route for {call.path}")


_NO_ROUTE = Route(_no_handler)  # for the errors of a request that has no route


def _error_code(reply: Reply) -> str:
    for name, value in reply.headers:
        if name == b"x-smg-error-code":
            return value.decode("latin-1")
    return ""


def _any_admin(methods: dict[str, Route] | None) -> bool:
    """For a request whose method has no route: treat the path as admin if any method is."""
    return methods is not None and any(route.admin for route in methods.values())


def _method_not_allowed(method: str, path: str, methods: dict[str, Route]) -> ApiError:
    allow = ", ".join(sorted(methods)).encode()
    return ApiError(
        405, "method_not_allowed", f"{method} is not allowed on {path}", [(b"allow", allow)]
    )
