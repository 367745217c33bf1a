"""Every error the gateway makes itself: status, envelope, error-code header; no collateral."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from support.harness import LOOPBACK, Gateway, Proc, Sim


def assert_envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-smg-error-code"] == code
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[Gateway, Sim]]:
    """A gateway with a 4 KiB body limit in front of one slow-ish sim."""
    sim = Sim("sim-e", "--itl-ms", "20")
    gateway = Gateway("--max-payload-size", "4096", workers=[sim.url])
    yield gateway, sim
    gateway.stop()
    sim.stop()


def test_malformed_json_is_400(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert_envelope(response, 400, "json_parse_error")


DEEP = b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # msgspec gives up: RecursionError


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'{"model": 7}', b'{"stream": "yes"}', b"", DEEP, b'{"model": "\xe9x"}']
)
def test_bodies_that_are_not_requests_are_400(small: tuple[Gateway, Sim], body: bytes) -> None:
    gateway, _ = small
    response = httpx.post(gateway.url + "/v1/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] in ("invalid_request", "json_parse_error")


def test_body_over_the_limit_is_413(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    response = httpx.post(gateway.url + "/v1/completions", json={"prompt": "x" * 5000})
    assert_envelope(response, 413, "payload_too_large")


def _raw_exchange(port: int, head: bytes, first_part: bytes) -> bytes:
    """Send a request head and only part of its body, then read what comes back."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(head + first_part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_413_comes_before_a_huge_declared_body_is_sent(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 104857600\r\n\r\n"
    )
    reply = _raw_exchange(gateway.port, head, b'{"prompt": "' + b"x" * 1000)
    assert reply.startswith(b"HTTP/1.1 413")


def test_413_stops_reading_a_chunked_body_at_the_limit(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 3000
    part = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    # 6 KB of an endless body: the gateway must answer without waiting for the end.
    reply = _raw_exchange(gateway.port, head, part * 2)
    assert reply.startswith(b"HTTP/1.1 413")


def test_unknown_path_is_404_and_wrong_method_is_405(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    assert_envelope(httpx.get(gateway.url + "/v2/unknown"), 404, "not_found")
    wrong = httpx.get(gateway.url + "/v1/chat/completions")
    assert_envelope(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"


def test_no_workers_is_503(procs: list[Proc]) -> None:
    gateway = Gateway()
    procs.append(gateway)
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert_envelope(response, 503, "no_workers")
    assert_envelope(httpx.get(gateway.url + "/v1/models"), 503, "no_models")
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/readiness").status_code == 503


def test_upstream_connection_failure_is_502(procs: list[Proc]) -> None:
    sim = Sim("sim-doomed")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    sim.kill()
    response = httpx.post(gateway.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert_envelope(response, 502, "upstream_unavailable")
    assert sim.url not in response.text  # the log names the worker; the client is not told
    # The gateway itself is fine.
    assert httpx.get(gateway.url + "/health").status_code == 200


def test_bad_requests_do_not_disturb_a_stream_in_flight(small: tuple[Gateway, Sim]) -> None:
    gateway, _ = small
    body = {"prompt": "long story", "max_tokens": 40, "stream": True}
    result: dict[str, object] = {}

    def stream() -> None:
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", gateway.url + "/v1/completions", json=body) as response,
        ):
            lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
        result["status"] = response.status_code
        result["lines"] = lines

    thread = threading.Thread(target=stream)
    thread.start()
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for _ in range(10):
            assert http.post("/v1/completions", content=b"{nope").status_code == 400
            assert http.post("/v1/completions", content=b"y" * 9000).status_code == 413
            assert http.get("/missing").status_code == 404
            assert http.delete("/v1/completions").status_code == 405
    thread.join(30)
    assert result["status"] == 200
    lines = result["lines"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    tokens = [json.loads(ln[6:])["choices"] for ln in lines[:-1]]
    assert sum(1 for c in tokens if c and c[0]["text"]) == 40


def test_api_key_guards_inference_and_admin_but_not_health(procs: list[Proc]) -> None:
    sim = Sim("sim-k")
    procs.append(sim)
    gateway = Gateway("--api-key", "s3cret", workers=[], ready=False)
    procs.append(gateway)
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/workers"),
        ("GET", "/get_loads"),
        ("POST", "/flush_cache"),
    ):
        response = httpx.request(
            method, gateway.url + path, json={}, headers={"authorization": "Bearer wrong"}
        )
        assert_envelope(response, 401, "unauthorized")
    assert httpx.get(gateway.url + "/health").status_code == 200
    ok = httpx.get(gateway.url + "/workers", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_cors_with_configured_origins_admits_only_those(procs: list[Proc]) -> None:
    gateway = Gateway("--cors-allowed-origins", "http://good.example")
    procs.append(gateway)
    good = httpx.get(gateway.url + "/health", headers={"origin": "http://good.example"})
    evil = httpx.get(gateway.url + "/health", headers={"origin": "http://evil.example"})
    assert good.headers["access-control-allow-origin"] == "http://good.example"
    assert good.headers["access-control-expose-headers"] == "x-request-id"
    assert "access-control-allow-origin" not in evil.headers
    preflight = httpx.options(
        gateway.url + "/v1/completions",
        headers={"origin": "http://good.example", "access-control-request-method": "POST"},
    )
    assert preflight.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
