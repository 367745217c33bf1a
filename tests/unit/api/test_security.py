"""What hostile clients and curious workers can no longer do (a whole gateway, in process).

Request ids, cross-site requests to admin routes, guarded info routes, credentials that stay
where they belong, error bodies that name no worker, the dashboard's sign-in.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from shunter.api.dashboard import SESSION_COOKIE, DashboardSessions
from shunter.config import ConfigError, GatewayConfig
from shunter.gateway import Gateway
from shunter.observability.logging import TextFormatter
from shunter.routing.retry import RetryConfig
from shunter.run import listens_beyond_loopback
from shunter.wire.mock import MockRequest, MockResponse, UpstreamError

from support.fakes import Answer, Workers, call, gateway, ok, ready


async def gateway_with(
    fail: dict[str, str] | None = None, workers: bool = True, **settings: Any
) -> tuple[Gateway, Workers]:
    """A gateway with one worker (unless ``workers`` is false) that fails with
    ``fail["kind"]`` while it is set."""
    failing = fail if fail is not None else {}

    def handler(request: MockRequest) -> MockResponse:
        if failing.get("kind"):
            message = f"cannot connect to {request.url}: [Errno 111] refused"
            raise UpstreamError(failing["kind"], message)
        return ok(request)

    network = Workers(handler)
    urls = ("http://w:1",) if workers else ()
    gw = gateway(urls, network=network, retry=RetryConfig(disabled=True), **settings)
    await ready(gw)
    return gw, network


def sent(network: Workers) -> list[tuple[bytes, bytes]]:
    return network.requests("http://w:1")[-1].headers


# --- request ids ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [b"caf\xe9-\xff", b"a" * 129, b"two words", b"<script>", b"line\x01break", b""],
)
async def test_a_request_id_that_is_not_short_and_plain_is_replaced(given: bytes) -> None:
    gw, network = await gateway_with()
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", [(b"x-request-id", given)])
    fresh = answer.header(b"x-request-id")
    assert answer.status == 200 and fresh is not None and fresh != given
    assert fresh.startswith(b"cmpl-")
    assert (b"x-request-id", fresh) in sent(network)
    await gw.close()


async def test_a_plain_request_id_is_kept_and_reaches_the_worker() -> None:
    gw, network = await gateway_with()
    given = b"Trace-42.a:b_c" + b"x" * 100
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", [(b"x-correlation-id", given)])
    assert answer.header(b"x-request-id") == given
    assert (b"x-request-id", given) in sent(network)
    await gw.close()


# --- routing edges ----------------------------------------------------------------------


async def test_head_is_answered_like_get() -> None:
    gw, _ = await gateway_with(workers=False)
    for path in ("/health", "/readiness", "/workers"):
        head, get = await call(gw.app, "HEAD", path), await call(gw.app, "GET", path)
        assert head.status == get.status
    refused = await call(gw.app, "HEAD", "/v1/completions")
    assert refused.status == 405 and refused.header(b"allow") == b"POST"
    await gw.close()


async def test_a_worker_url_in_the_path_is_percent_decoded_once() -> None:
    gw, _ = await gateway_with()
    once = quote("http://w:1", safe="")
    raw = f"/workers/{once}".encode()
    found = await call(gw.app, "GET", "/workers/http://w:1", raw_path=raw)
    assert found.status == 200 and found.json()["url"] == "http://w:1"
    twice = quote(once, safe="")  # the server decodes this to /workers/<once>
    raw = f"/workers/{twice}".encode()
    refused = await call(gw.app, "GET", f"/workers/{once}", raw_path=raw)
    # Decoded once, it is still percent-encoded: neither a worker id nor a URL.
    assert refused.status == 400 and repr(once) in refused.json()["error"]["message"]
    await gw.close()


# --- cross-site requests ----------------------------------------------------------------


async def test_admin_routes_refuse_other_sites_pages() -> None:
    gw, _ = await gateway_with()
    evil = [(b"origin", b"http://evil.example"), (b"host", b"gateway:30000")]
    body = orjson.dumps({"url": "http://attacker.example:8000"})
    for method, path, payload in (
        ("POST", "/workers", body),
        ("GET", "/workers", b""),
        ("DELETE", "/workers/http%3A%2F%2Fw%3A1", b""),
        ("POST", "/flush_cache", b""),
        ("GET", "/dashboard/data", b""),
    ):
        answer = await call(gw.app, method, path, payload, evil)
        assert answer.status == 403, path
        assert answer.json()["error"]["code"] == "cross_origin_refused"
        assert answer.header(b"access-control-allow-origin") is None
    assert len(gw.fleet.registry) == 1 and not gw.fleet.jobs.status("http://attacker.example:8000")
    preflight = await call(
        gw.app, "OPTIONS", "/workers", headers=[*evil, (b"access-control-request-method", b"POST")]
    )
    assert preflight.header(b"access-control-allow-origin") is None
    await gw.close()


async def test_inference_stays_open_to_any_origin_and_admin_to_its_own() -> None:
    gw, _ = await gateway_with()
    page = [(b"origin", b"http://app.example"), (b"host", b"gateway:30000")]
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", page)
    assert answer.status == 200 and answer.header(b"access-control-allow-origin") == b"*"
    own = [(b"origin", b"http://localhost:30000"), (b"host", b"localhost:30000")]
    assert (await call(gw.app, "GET", "/workers", headers=own)).status == 200
    assert (await call(gw.app, "GET", "/workers")).status == 200  # curl sends no Origin
    await gw.close()


def same_origin(host: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a page served from ``host`` calling the gateway at ``host``."""
    return [(b"origin", b"http://" + host), (b"host", host)]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        (b"attacker.example:30000", 403),  # re-pointed at the gateway: DNS rebinding
        (b"gateway.example:30000", 403),
        (b"localhost:30000", 200),
        (b"127.0.0.1:30000", 200),
        (b"127.0.0.2", 200),
        (b"[::1]:30000", 200),
        (b"gw.internal:30000", 200),  # the --host it listens on
    ],
)
async def test_without_a_key_only_unmovable_hosts_are_the_gateways_own_origin(
    host: bytes, status: int
) -> None:
    gw, _ = await gateway_with(host="gw.internal")
    answer = await call(gw.app, "GET", "/workers", headers=same_origin(host))
    assert answer.status == status
    await gw.close()


async def test_with_a_key_any_host_the_request_names_is_its_own_origin() -> None:
    gw, _ = await gateway_with(api_key="gk")
    headers = [*same_origin(b"gateway.example:30000"), (b"authorization", b"Bearer gk")]
    assert (await call(gw.app, "GET", "/workers", headers=headers)).status == 200
    await gw.close()


async def test_a_listed_origin_may_use_admin_routes() -> None:
    gw, _ = await gateway_with(workers=False, cors_allowed_origins=["http://ops.example"])
    ops = [(b"origin", b"http://ops.example"), (b"host", b"gateway:30000")]
    answer = await call(gw.app, "GET", "/workers", headers=ops)
    assert answer.status == 200
    assert answer.header(b"access-control-allow-origin") == b"http://ops.example"
    await gw.close()


def cors_echoing_worker(request: MockRequest) -> MockResponse:
    """A worker that answers CORS itself, as SGLang and vLLM do: any origin, credentials."""
    origin = request.header(b"origin") or b"*"
    headers = [
        (b"content-type", b"application/json"),
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"*"),
    ]
    return MockResponse(200, headers, b"{}")


def values(answer: Answer, name: bytes) -> list[bytes]:
    return [v for k, v in answer.headers if k == name]


async def test_a_workers_own_cors_headers_never_reach_the_client() -> None:
    network = Workers(cors_echoing_worker)
    gw = gateway(network=network, cors_allowed_origins=["https://ops.example"])
    await ready(gw)
    evil = [(b"origin", b"https://evil.example")]
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", evil)
    assert answer.status == 200
    assert not [k for k, _ in answer.headers if k.startswith(b"access-control-")]
    assert network.requests("http://w:1")[-1].header(b"origin") is None  # not forwarded
    ops = [(b"origin", b"https://ops.example")]
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", ops)
    assert values(answer, b"access-control-allow-origin") == [b"https://ops.example"]
    assert values(answer, b"access-control-allow-credentials") == []
    await gw.close()


async def test_without_listed_origins_a_reply_carries_the_gateways_cors_headers_once() -> None:
    gw = gateway(handler=cors_echoing_worker)
    await ready(gw)
    page = [(b"origin", b"https://app.example")]
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", page)
    assert values(answer, b"access-control-allow-origin") == [b"*"]
    assert values(answer, b"access-control-expose-headers") == [b"*"]
    assert values(answer, b"access-control-allow-credentials") == []
    await gw.close()


# --- what open routes reveal ---------------------------------------------------------------


async def test_with_a_key_the_info_routes_are_guarded_and_health_is_not() -> None:
    gw, _ = await gateway_with(api_key="gk")
    for path in ("/engine_metrics", "/get_server_info", "/get_model_info", "/health_generate"):
        assert (await call(gw.app, "GET", path)).status == 401, path
    for path in ("/health", "/liveness", "/readiness", "/v1/models"):
        assert (await call(gw.app, "GET", path)).status == 200, path
    await gw.close()


async def test_a_failing_worker_is_not_named_to_the_client(caplog: Any) -> None:
    fail: dict[str, str] = {}
    gw, _ = await gateway_with(fail)
    fail["kind"] = "connect"
    with caplog.at_level(logging.WARNING, logger="shunter"):
        answer = await call(gw.app, "POST", "/v1/completions", b"{}")
    assert answer.status == 502
    assert answer.json()["error"]["message"] == "the worker could not be reached"
    assert b"w:1" not in answer.body and b"Errno" not in answer.body
    assert any("Errno 111" in str(getattr(r, "error", "")) for r in caplog.records)
    await gw.close()


class InfoRefused(Workers):
    """A worker whose model info cannot be reached (its server info is the fakes')."""

    def control_handler(self, request: MockRequest) -> MockResponse:
        raise UpstreamError("connect", f"cannot connect to {request.url}: [Errno 111] refused")


async def test_admin_errors_name_no_worker_and_the_log_has_it(caplog: Any) -> None:
    fail = {"kind": "connect"}
    gw, _ = await gateway_with(fail)
    with caplog.at_level(logging.WARNING, logger="shunter"):
        answer = await call(gw.app, "GET", "/health_generate", headers=[(b"x-request-id", b"r1")])
    assert answer.status == 503
    message = answer.json()["error"]["message"]
    assert message == "the generation check failed: the worker could not be reached"
    assert b"w:1" not in answer.body and b"Errno" not in answer.body
    [logged] = [r for r in caplog.records if r.getMessage() == "generation check failed"]
    assert getattr(logged, "url", "") == "http://w:1" and getattr(logged, "request_id", "") == "r1"
    assert "Errno 111" in getattr(logged, "error", "")
    await gw.close()

    gw = gateway(network=InfoRefused(), retry=RetryConfig(disabled=True))
    await ready(gw)
    answer = await call(gw.app, "GET", "/get_model_info")
    assert answer.status == 502
    assert answer.json()["error"]["message"] == "the worker could not be reached"
    assert b"w:1" not in answer.body and b"Errno" not in answer.body
    await gw.close()


async def test_a_path_cannot_forge_a_line_of_the_text_access_log() -> None:
    gw, _ = await gateway_with()
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(TextFormatter())
    access = logging.getLogger("shunter.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    forged = "/x\r\n2030-01-01 00:00:00 INFO shunter.access: GET /workers 200 \\x0a\u2028"
    try:
        assert (await call(gw.app, "GET", forged)).status == 404
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    [line] = lines.getvalue().splitlines()
    assert "/x\\x0d\\x0a2030-01-01" in line and "200 \\\\x0a\\u2028 404" in line
    await gw.close()


def test_a_traceback_in_the_text_log_keeps_its_lines() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.makeLogRecord(
            {"msg": "failed", "exc_info": sys.exc_info(), "path": "/a\nb"}
        )
    text = TextFormatter().format(record)
    first, *rest = text.splitlines()
    assert (
        first.endswith("failed path=/a\\x0ab") and rest[0] == "Traceback (most recent call last):"
    )


# --- credentials ------------------------------------------------------------------------


def authorization(network: Workers) -> list[bytes]:
    return [v for k, v in sent(network) if k == b"authorization"]


async def test_the_gateway_key_never_reaches_a_worker() -> None:
    gw, network = await gateway_with(api_key="gk")
    answer = await call(
        gw.app, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer gk")]
    )
    assert answer.status == 200 and authorization(network) == []
    await gw.close()


async def test_a_worker_gets_its_own_key_or_else_the_clients_own_credential() -> None:
    gw, network = await gateway_with()
    await call(gw.app, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer user")])
    assert authorization(network) == [b"Bearer user"]
    await gw.close()
    gw, network = await gateway_with(worker_api_key="wk")
    await call(gw.app, "POST", "/v1/completions", b"{}", [(b"authorization", b"Bearer user")])
    assert authorization(network) == [b"Bearer wk"]
    await gw.close()


async def test_connection_named_headers_and_expect_are_not_forwarded() -> None:
    gw, network = await gateway_with()
    headers = [
        (b"connection", b"keep-alive, X-Correlation-Id"),
        (b"x-correlation-id", b"1"),  # allowed, but named by Connection: this hop's only
        (b"x-request-id-kept", b"2"),
        (b"expect", b"100-continue"),
    ]
    await call(gw.app, "POST", "/v1/completions", b"{}", headers)
    names = {k for k, _ in sent(network)}
    assert b"x-request-id-kept" in names
    assert not {b"x-correlation-id", b"expect", b"connection"} & names
    await gw.close()


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [(b"Bearer gk", b"Bearer wrong", 200), (b"Bearer wrong", b"Bearer gk", 401)],
)
async def test_of_several_authorization_headers_the_first_counts_everywhere(
    first: bytes, second: bytes, status: int
) -> None:
    gw, _ = await gateway_with(api_key="gk")
    both = [(b"authorization", first), (b"authorization", second)]
    inference = await call(gw.app, "POST", "/v1/completions", b"{}", both)
    workers = await call(gw.app, "GET", "/workers", headers=both)
    dashboard = await call(gw.app, "GET", "/dashboard/data", headers=both)
    assert [inference.status, workers.status, dashboard.status] == [status] * 3
    await gw.close()


# --- the dashboard's sign-in ---------------------------------------------------------------


def cookie_of(answer: Answer) -> bytes:
    value = answer.header(b"set-cookie")
    assert value is not None
    attributes = value.split(b"; ")
    assert b"HttpOnly" in attributes and b"SameSite=Strict" in attributes
    assert b"Path=/dashboard" in attributes
    return attributes[0]


async def test_the_dashboard_exchanges_the_key_for_a_session_cookie() -> None:
    gw, _ = await gateway_with(workers=False, api_key="gk")
    app = gw.app
    sign_in = await call(app, "GET", "/dashboard")
    assert sign_in.status == 401 and b'<form method="post"' in sign_in.body
    assert b"frame-ancestors 'none'" in (sign_in.header(b"content-security-policy") or b"")
    assert (await call(app, "GET", "/dashboard", query=b"api_key=wrong")).status == 401
    redirect = await call(app, "GET", "/dashboard", query=b"api_key=gk")
    assert redirect.status == 303 and redirect.header(b"location") == b"/dashboard"
    cookie = cookie_of(redirect)
    page = await call(app, "GET", "/dashboard", headers=[(b"cookie", b"a=1; " + cookie)])
    assert page.status == 200 and b"Shunter fleet" in page.body
    policy = page.header(b"content-security-policy") or b""
    assert b"script-src 'sha256-" in policy and b"default-src 'none'" in policy
    assert page.header(b"x-frame-options") == b"DENY"
    assert page.header(b"x-content-type-options") == b"nosniff"
    data = await call(app, "GET", "/dashboard/data", headers=[(b"cookie", cookie)])
    assert data.status == 200 and data.json()["workers"] == []
    forged = cookie.split(b".")[0] + b".00"
    assert (await call(app, "GET", "/dashboard/data", headers=[(b"cookie", forged)])).status == 401
    await gw.close()


async def test_the_sign_in_form_posts_the_key_in_the_body() -> None:
    gw, _ = await gateway_with(workers=False, api_key="gk")
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    assert (await call(gw.app, "POST", "/dashboard/login", b"api_key=nope", form)).status == 401
    answer = await call(gw.app, "POST", "/dashboard/login", b"api_key=gk", form)
    assert answer.status == 303
    cookie = cookie_of(answer)
    assert (await call(gw.app, "GET", "/dashboard", headers=[(b"cookie", cookie)])).status == 200
    await gw.close()


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


@pytest.mark.parametrize("expiry", [b"\xb2", b"12\xb9", b"\xb3\xb3", b"", b"-1", b"1e9"])
async def test_a_crafted_session_cookie_is_refused_not_a_500(expiry: bytes) -> None:
    gw, _ = await gateway_with(workers=False, api_key="gk")
    cookie = SESSION_COOKIE.encode() + b"=" + expiry + b".00"  # "\xb2" is "²" in latin-1
    for path in ("/dashboard", "/dashboard/data"):
        answer = await call(gw.app, "GET", path, headers=[(b"cookie", cookie)])
        assert answer.status == 401, (path, expiry)
    await gw.close()


@pytest.mark.parametrize(
    ("host", "open_"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("gateway.example", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_listening_beyond_loopback_is_recognised(host: str, open_: bool) -> None:
    assert listens_beyond_loopback(host) is open_


@pytest.mark.parametrize(
    "key", ["a\r\nx-injected: 1", "caf\u00e9", "two words", "\u20ac", "tab\there"]
)
async def test_a_worker_key_that_cannot_be_sent_as_given_is_refused(key: str) -> None:
    gw, _ = await gateway_with()
    added = await call(
        gw.app, "POST", "/workers", orjson.dumps({"url": "http://v:1", "api_key": key})
    )
    assert added.status == 400 and "visible ASCII" in added.json()["error"]["message"]
    raw = b"/workers/" + quote("http://w:1", safe="").encode()
    update = orjson.dumps({"api_key": key})
    updated = await call(gw.app, "PUT", "/workers/http://w:1", update, raw_path=raw)
    assert updated.status == 400
    assert (await call(gw.app, "POST", "/v1/completions", b"{}")).status == 200
    await gw.close()


@pytest.mark.parametrize("flag", ["--api-key", "--worker-api-key"])
@pytest.mark.parametrize("key", ["a b", "caf\u00e9", "x\n"])
def test_a_gateway_or_worker_key_flag_that_cannot_be_sent_is_refused(flag: str, key: str) -> None:
    config = (
        GatewayConfig(api_key=key) if flag == "--api-key" else GatewayConfig(worker_api_key=key)
    )
    with pytest.raises(ConfigError, match=f"{flag} must be visible ASCII"):
        config.validate()
