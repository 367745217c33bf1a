"""Which client headers an HTTP worker receives: the allow-list, and --forward-headers."""

from __future__ import annotations

import pytest

from shunter.backends.base import Outbound
from shunter.backends.http.backend import forwarded_headers
from shunter.backends.http.forwarding import ForwardRule
from shunter.cli import main, serve_config
from shunter.config import ConfigError, GatewayConfig

# What a browser, an SDK and a proxy in front of the gateway may all have added.
CLIENT = [
    (b"host", b"gateway:30000"),
    (b"user-agent", b"OpenAI/Python 1.40.0"),
    (b"content-type", b"application/json"),
    (b"accept", b"text/event-stream"),
    (b"accept-encoding", b"gzip"),
    (b"content-length", b"2"),
    (b"authorization", b"Bearer user"),
    (b"cookie", b"session=secret"),
    (b"x-api-key", b"sk-other-service"),
    (b"proxy-authorization", b"Basic cHJveHk="),
    (b"x-forwarded-for", b"10.0.0.7"),
    (b"x-tenant", b"acme"),
    (b"x-request-id", b"client-id"),
    (b"x-request-id-upstream", b"abc"),
    (b"x-correlation-id", b"corr-1"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    (b"tracestate", b"vendor=1"),
    (b"x-smg-routing-key", b"conversation-9"),
    (b"origin", b"https://evil.example"),
    (b"expect", b"100-continue"),
]
ALLOWED_BY_DEFAULT = [
    (b"content-type", b"application/json"),
    (b"accept", b"text/event-stream"),
    (b"authorization", b"Bearer user"),
    (b"x-request-id-upstream", b"abc"),
    (b"x-correlation-id", b"corr-1"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    (b"tracestate", b"vendor=1"),
    (b"x-smg-routing-key", b"conversation-9"),
]


def outbound(headers: list[tuple[bytes, bytes]], trace: list[tuple[bytes, bytes]] = []) -> Outbound:  # noqa: B006
    return Outbound("POST", "/v1/chat/completions", b"", headers, b"{}", False, "gw-1", "m", trace)


def test_only_the_allow_list_reaches_a_worker_and_one_request_id() -> None:
    sent = forwarded_headers(outbound(CLIENT), None)
    assert sent == [*ALLOWED_BY_DEFAULT, (b"x-request-id", b"gw-1")]


def test_a_worker_key_replaces_the_clients_authorization() -> None:
    sent = forwarded_headers(outbound(CLIENT), "wk")
    assert [v for k, v in sent if k == b"authorization"] == [b"Bearer wk"]


def test_the_gateways_trace_context_replaces_the_clients() -> None:
    ours = [(b"traceparent", b"00-ours-01")]
    sent = forwarded_headers(outbound(CLIENT, ours), None)
    assert [(k, v) for k, v in sent if k.startswith(b"trace")] == ours


def test_forward_headers_adds_names_in_any_case() -> None:
    rule = ForwardRule(["X-Api-Key", " x-TENANT "])
    names = [k for k, _ in forwarded_headers(outbound(CLIENT), None, rule)]
    assert b"x-api-key" in names and b"x-tenant" in names
    assert not {b"cookie", b"proxy-authorization", b"x-forwarded-for", b"user-agent"} & set(names)


def test_naming_x_request_id_still_sends_only_the_gateways() -> None:
    sent = forwarded_headers(outbound(CLIENT), None, ForwardRule(["x-request-id"]))
    assert [v for k, v in sent if k == b"x-request-id"] == [b"gw-1"]


@pytest.mark.parametrize(
    "name",
    [
        "cookie",
        "Host",
        "content-length",
        "Connection",
        "proxy-authorization",
        "transfer-encoding",
        "te",
        "upgrade",
        "expect",
        "origin",
    ],
)
def test_a_header_that_is_never_forwarded_is_refused_at_start(name: str) -> None:
    with pytest.raises(ConfigError, match=f"--forward-headers {name.lower()}: never forwarded"):
        GatewayConfig(forward_headers=[name]).validate()


@pytest.mark.parametrize("name", ["", "two words", "x-a:b", "caf\u00e9"])
def test_a_name_that_is_not_a_header_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="not a header name"):
        GatewayConfig(forward_headers=[name]).validate()


def test_the_config_keeps_the_names_lowercased() -> None:
    config = GatewayConfig(forward_headers=["X-Tenant"]).validate()
    assert config.forward_headers == ["x-tenant"]


def test_the_flag_reaches_the_config_and_a_refused_name_stops_the_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert serve_config(["--forward-headers", "X-Tenant", "x-api-key"]).forward_headers == [
        "x-tenant",
        "x-api-key",
    ]
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--forward-headers", "Cookie"])
    assert exited.value.code == 2
    assert "--forward-headers cookie: never forwarded" in capsys.readouterr().err
