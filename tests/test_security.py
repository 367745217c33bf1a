"""What hostile clients and curious workers can no longer do (in-process, fake workers).

Request ids, cross-site requests to admin routes, guarded info routes, credentials that stay
where they belong, error bodies that name no worker, the dashboard's sign-in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from shunter.aio.once import OnceCell
from shunter.config import GatewayConfig
from shunter.fleet.worker import Worker
from shunter.routing.retry import RetryConfig
from shunter.server.app import GatewayApp
from shunter.server.dashboard import SESSION_COOKIE, DashboardSessions
from shunter.server.state import GatewayState
from shunter.transport.base import FullResponse, HeaderPairs, UpstreamError


class RecordingClient:
    """A worker's client that records what it was sent and answers 200, or fails."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]]]] = []
        self.fail: str | None = None

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        self.seen.append((url, list(headers)))
        if self.fail:
            raise UpstreamError(self.fail, f"cannot connect to {url}: [Errno 111] refused")
        return FullResponse(200, [("content-type", "application/json")], b'{"ok": true}')

    async def close(self) -> None:
        pass


def gateway(*workers: Worker, **settings: Any) -> tuple[GatewayApp, RecordingClient]:
    config = GatewayConfig(
        prometheus_port=0, policy="round_robin", retry=RetryConfig(disabled=True), **settings
    )
    state = GatewayState(config.validate(), client_factory=lambda _: RecordingClient())  # type: ignore[arg-type,return-value]
    client = RecordingClient()

    async def create() -> RecordingClient:
        return client

    for worker in workers:
        worker.client_cell = OnceCell(create)  # type: ignore[arg-type]
        worker.healthy = True
        state.registry.register(worker)
        state.fleet_changed([worker], ())
    return GatewayApp(state), client


class Answer:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def send(
    app: GatewayApp,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    raw_path: bytes | None = None,
    query: bytes = b"",
) -> Answer:
    """One request through the app as our server hands it over (path decoded once)."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": raw_path or path.encode(),
        "query_string": query,
        "scheme": "http",
        "headers": [(b"content-length", b"%d" % len(body)), *(headers or [])],
    }
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {}

    async def collect(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, collect)
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], list(start["headers"]), payload)


# --- request ids ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [b"caf\xe9-\xff", b"a" * 129, b"two words", b"<script>", b"line\x01break", b""],
)
async def test_a_request_id_that_is_not_short_and_plain_is_replaced(given: bytes) -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)))
    answer = await send(app, "POST", "/v1/completions", b"{}", [(b"x-request-id", given)])
    fresh = answer.header(b"x-request-id")
    assert answer.status == 200 and fresh is not None and fresh != given
    assert fresh.startswith(b"cmpl-")
    assert ("x-request-id", fresh.decode()) in client.seen[0][1]


async def test_a_plain_request_id_is_kept_and_reaches_the_worker() -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)))
    given = b"Trace-42.a:b_c" + b"x" * 100
    answer = await send(app, "POST", "/v1/completions", b"{}", [(b"x-correlation-id", given)])
    assert answer.header(b"x-request-id") == given
    assert ("x-request-id", given.decode()) in client.seen[0][1]


# --- routing edges ----------------------------------------------------------------------


async def test_head_is_answered_like_get() -> None:
    app, _ = gateway()
    for path in ("/health", "/readiness", "/workers"):
        head, get = await send(app, "HEAD", path), await send(app, "GET", path)
        assert head.status == get.status
    refused = await send(app, "HEAD", "/v1/completions")
    assert refused.status == 405 and refused.header(b"allow") == b"POST"


async def test_a_worker_url_in_the_path_is_percent_decoded_once() -> None:
    app, _ = gateway(Worker(url="http://w:1", models=("m",)))
    once = quote("http://w:1", safe="")
    found = await send(app, "GET", "/workers/http://w:1", raw_path=f"/workers/{once}".encode())
    assert found.status == 200 and found.json()["url"] == "http://w:1"
    twice = quote(once, safe="")  # the server decodes this to /workers/<once>
    missing = await send(app, "GET", f"/workers/{once}", raw_path=f"/workers/{twice}".encode())
    assert missing.status == 404


# --- cross-site requests ----------------------------------------------------------------


async def test_admin_routes_refuse_other_sites_pages() -> None:
    app, _ = gateway(Worker(url="http://w:1", models=("m",)))
    evil = [(b"origin", b"http://evil.example"), (b"host", b"gateway:30000")]
    body = orjson.dumps({"url": "http://attacker.example:8000"})
    for method, path, payload in (
        ("POST", "/workers", body),
        ("GET", "/workers", b""),
        ("DELETE", "/workers/http%3A%2F%2Fw%3A1", b""),
        ("POST", "/flush_cache", b""),
        ("GET", "/dashboard/data", b""),
    ):
        answer = await send(app, method, path, payload, evil)
        assert answer.status == 403, path
        assert answer.json()["error"]["code"] == "cross_origin_refused"
        assert answer.header(b"access-control-allow-origin") is None
    assert len(app.state.registry) == 1
    preflight = await send(
        app, "OPTIONS", "/workers", headers=[*evil, (b"access-control-request-method", b"POST")]
    )
    assert preflight.header(b"access-control-allow-origin") is None


async def test_inference_stays_open_to_any_origin_and_admin_to_its_own() -> None:
    app, _ = gateway(Worker(url="http://w:1", models=("m",)))
    page = [(b"origin", b"http://app.example"), (b"host", b"gateway:30000")]
    answer = await send(app, "POST", "/v1/completions", b"{}", page)
    assert answer.status == 200 and answer.header(b"access-control-allow-origin") == b"*"
    own = [(b"origin", b"http://gateway:30000"), (b"host", b"gateway:30000")]
    assert (await send(app, "GET", "/workers", headers=own)).status == 200
    assert (await send(app, "GET", "/workers")).status == 200  # curl sends no Origin


async def test_a_listed_origin_may_use_admin_routes() -> None:
    app, _ = gateway(cors_allowed_origins=["http://ops.example"])
    ops = [(b"origin", b"http://ops.example"), (b"host", b"gateway:30000")]
    answer = await send(app, "GET", "/workers", headers=ops)
    assert answer.status == 200
    assert answer.header(b"access-control-allow-origin") == b"http://ops.example"


# --- what open routes reveal ---------------------------------------------------------------


async def test_with_a_key_the_info_routes_are_guarded_and_health_is_not() -> None:
    app, _ = gateway(Worker(url="http://w:1", models=("m",)), api_key="gk")
    for path in ("/engine_metrics", "/get_server_info", "/get_model_info", "/health_generate"):
        answer = await send(app, "GET", path)
        assert answer.status == 401, path
    for path in ("/health", "/liveness", "/readiness", "/v1/models"):
        assert (await send(app, "GET", path)).status == 200, path


async def test_a_failing_worker_is_not_named_to_the_client(caplog: Any) -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)))
    client.fail = "connect"
    with caplog.at_level(logging.WARNING, logger="shunter"):
        answer = await send(app, "POST", "/v1/completions", b"{}")
    assert answer.status == 502
    assert answer.json()["error"]["message"] == "the worker could not be reached"
    assert b"w:1" not in answer.body and b"Errno" not in answer.body
    assert any("Errno 111" in str(getattr(r, "error", "")) for r in caplog.records)


# --- credentials ------------------------------------------------------------------------


def authorization(client: RecordingClient) -> list[str]:
    return [v for k, v in client.seen[-1][1] if k == "authorization"]


async def test_the_gateway_key_never_reaches_a_worker() -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)), api_key="gk")
    answer = await send(app, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer gk")])
    assert answer.status == 200 and authorization(client) == []


async def test_a_worker_gets_its_own_key_or_else_the_clients_own_credential() -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)))
    await send(app, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer user")])
    assert authorization(client) == ["Bearer user"]
    keyed, keyed_client = gateway(Worker(url="http://w:1", models=("m",), api_key="wk"))
    await send(keyed, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer user")])
    assert authorization(keyed_client) == ["Bearer wk"]


async def test_connection_named_headers_and_expect_are_not_forwarded() -> None:
    app, client = gateway(Worker(url="http://w:1", models=("m",)))
    await send(app, "POST", "/v1/completions", b"{}", [
        (b"connection", b"keep-alive, X-Secret"), (b"x-secret", b"1"), (b"x-kept", b"2"),
        (b"expect", b"100-continue"),
    ])  # fmt: skip
    names = {k for k, _ in client.seen[0][1]}
    assert "x-kept" in names and not {"x-secret", "expect", "connection"} & names


# --- the dashboard's sign-in ---------------------------------------------------------------


def cookie_of(answer: Answer) -> bytes:
    value = answer.header(b"set-cookie")
    assert value is not None
    attributes = value.split(b"; ")
    assert b"HttpOnly" in attributes and b"SameSite=Strict" in attributes
    assert b"Path=/dashboard" in attributes
    return attributes[0]


async def test_the_dashboard_exchanges_the_key_for_a_session_cookie() -> None:
    app, _ = gateway(api_key="gk")
    sign_in = await send(app, "GET", "/dashboard")
    assert sign_in.status == 401 and b'<form method="post"' in sign_in.body
    assert b"frame-ancestors 'none'" in (sign_in.header(b"content-security-policy") or b"")
    assert (await send(app, "GET", "/dashboard", query=b"api_key=wrong")).status == 401
    redirect = await send(app, "GET", "/dashboard", query=b"api_key=gk")
    assert redirect.status == 303 and redirect.header(b"location") == b"/dashboard"
    cookie = cookie_of(redirect)
    page = await send(app, "GET", "/dashboard", headers=[(b"cookie", b"a=1; " + cookie)])
    assert page.status == 200 and b"Shunter fleet" in page.body
    policy = page.header(b"content-security-policy") or b""
    assert b"script-src 'sha256-" in policy and b"default-src 'none'" in policy
    assert page.header(b"x-frame-options") == b"DENY"
    assert page.header(b"x-content-type-options") == b"nosniff"
    data = await send(app, "GET", "/dashboard/data", headers=[(b"cookie", cookie)])
    assert data.status == 200 and data.json()["workers"] == []
    forged = cookie.split(b".")[0] + b".00"
    assert (await send(app, "GET", "/dashboard/data", headers=[(b"cookie", forged)])).status == 401


async def test_the_sign_in_form_posts_the_key_in_the_body() -> None:
    app, _ = gateway(api_key="gk")
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    assert (await send(app, "POST", "/dashboard/login", b"api_key=nope", form)).status == 401
    answer = await send(app, "POST", "/dashboard/login", b"api_key=gk", form)
    assert answer.status == 303
    cookie = cookie_of(answer)
    assert (await send(app, "GET", "/dashboard", headers=[(b"cookie", cookie)])).status == 200


def test_a_session_expires_and_a_new_key_signs_everyone_out() -> None:
    now = [1_000_000.0]
    sessions = DashboardSessions("gk", clock=lambda: now[0])
    value = sessions.issue(secure=True).split(b";")[0]
    assert sessions.issue(secure=True).endswith(b"; Secure")
    scope = {"headers": [(b"cookie", value)]}
    assert sessions.valid(scope)
    assert not DashboardSessions("other", clock=lambda: now[0]).valid(scope)
    now[0] += 13 * 3600
    assert not sessions.valid(scope)
    assert SESSION_COOKIE.encode() in value


async def test_listening_beyond_loopback_without_a_key_is_warned_about(caplog: Any) -> None:
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("::1", False)):
        app, _ = gateway(host=host)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shunter"):
            app.startup()
            await app.shutdown()
        assert any("without --api-key" in r.message for r in caplog.records) is warned, host
