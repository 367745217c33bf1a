"""The HTTP/1.1 server itself, over raw sockets: keep-alive, pipelining, bodies, edge cases."""

from __future__ import annotations

import asyncio
import gc
import re
import resource
from collections.abc import AsyncIterator

import pytest

from shunter.cli import serve_config
from shunter.config import GatewayConfig
from shunter.sim.send import send_bytes
from shunter.wire.asgi import Receive, Scope, Send, read_body
from shunter.wire.limits import RESERVED_FILES, ServerLimits, default_max_connections
from shunter.wire.server import HttpServer

from support.sockets import read_until_closed

LEFT: list[str] = []


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echoes method, path and body; /stream sends three chunks; /leave waits for a disconnect."""
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one", b"two", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/leave":
        await read_body(receive, 1 << 20, None)
        try:
            message = await receive()
            LEFT.append(message["type"])
        except asyncio.CancelledError:
            LEFT.append("cancelled")
            raise
        return
    if scope["path"] == "/boom":
        raise RuntimeError("the app failed")
    body = await read_body(receive, 1 << 20, None)
    reply = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body)
    await send_bytes(send, 200, reply, [(b"content-type", b"text/plain")])


@pytest.fixture
async def server() -> AsyncIterator[int]:
    http = HttpServer(echo_app, keep_alive_secs=60)
    port = await http.listen("127.0.0.1", 0)
    yield port
    await http.shutdown(1)


async def test_keep_alive_serves_several_requests_on_one_connection(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    for i in range(3):
        body = b"n=%d" % i
        writer.write(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"date: " in head
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        assert await reader.readexactly(length) == b"POST /echo n=%d" % i
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: int) -> None:
    raw = b"".join(b"GET /p%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(4))
    raw += b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    data = await read_until_closed(server, raw)
    assert re.findall(rb"GET /p(\d) ", data) == [b"0", b"1", b"2", b"3"]
    assert data.count(b"HTTP/1.1 200 OK") == 5
    assert data.endswith(b"GET /last ")


async def test_chunked_request_body_is_reassembled(server: int) -> None:
    raw = (
        b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    data = await read_until_closed(server, raw)
    assert data.endswith(b"POST /c hello world")


async def test_expect_100_continue_is_honoured(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_http10_gets_its_answer_and_a_close(server: int) -> None:
    data = await read_until_closed(server, b"GET /old HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data
    assert data.endswith(b"GET /old ")


async def test_streamed_response_uses_chunked_encoding(server: int) -> None:
    data = await read_until_closed(
        server, b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    assert b"transfer-encoding: chunked" in data
    assert data.endswith(b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n")


async def test_garbage_gets_400_and_a_close(server: int) -> None:
    data = await read_until_closed(server, b"THIS IS NOT HTTP\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")


async def test_app_error_before_the_response_is_a_500(server: int) -> None:
    data = await read_until_closed(server, b"GET /boom HTTP/1.1\r\nhost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500")


async def test_the_app_is_cancelled_when_its_client_leaves(server: int) -> None:
    LEFT.clear()
    _reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /leave HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    for _ in range(100):
        if LEFT:
            break
        await asyncio.sleep(0.01)
    assert LEFT == ["cancelled"]


async def test_shutdown_drains_a_request_in_flight() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send_bytes(send, 200, b"finished")

    http = HttpServer(slow_app)
    port = await http.listen("127.0.0.1", 0)
    request = asyncio.ensure_future(read_until_closed(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(http.shutdown(5))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    release.set()
    await stopping
    data = await request
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"finished")


# --- limits: configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        (ServerLimits(max_request_line_bytes=10), "--max-request-line-bytes"),
        (ServerLimits(max_header_bytes=0), "--max-header-bytes"),
        (ServerLimits(max_headers=0), "--max-headers"),
        (ServerLimits(max_request_head_bytes=100), "--max-request-head-bytes"),
        (ServerLimits(request_head_timeout_secs=0), "--request-head-timeout-secs"),
        (ServerLimits(request_body_timeout_secs=-1), "--request-body-timeout-secs"),
        (ServerLimits(max_connections=0), "--max-connections"),
    ],
)
def test_a_bad_limit_is_refused_by_its_flag_name(limits: ServerLimits, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        limits.validate()


def test_the_connection_cap_defaults_to_half_the_open_files_less_a_reserve() -> None:
    assert default_max_connections(20_000) == (20_000 - RESERVED_FILES) // 2
    assert default_max_connections(RESERVED_FILES) == 1
    assert default_max_connections(resource.RLIM_INFINITY) == ((1 << 20) - RESERVED_FILES) // 2
    assert ServerLimits(max_connections=5).connection_cap() == 5
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert ServerLimits().connection_cap() == default_max_connections(soft)


def test_serve_flags_set_the_server_limits(capsys: pytest.CaptureFixture[str]) -> None:
    def config_for(*argv: str) -> GatewayConfig:
        return serve_config(argv)

    assert config_for().server_limits == ServerLimits()
    flags = {
        "--max-request-line-bytes": "4000",
        "--max-header-bytes": "2000",
        "--max-headers": "20",
        "--max-request-head-bytes": "9000",
        "--request-head-timeout-secs": "5",
        "--request-body-timeout-secs": "7",
        "--max-connections": "300",
    }
    argv = [part for flag_and_value in flags.items() for part in flag_and_value]
    assert config_for(*argv).server_limits == ServerLimits(4000, 2000, 20, 9000, 5.0, 7.0, 300)
    with pytest.raises(SystemExit):
        config_for("--max-request-head-bytes", "1000", "--max-request-line-bytes", "2000")
    assert "--max-request-head-bytes must be >= --max-request-line-bytes" in capsys.readouterr().err


async def test_shutdown_returns_once_the_cancelled_apps_have_cleaned_up() -> None:
    started = asyncio.Event()
    cleaned: list[str] = []

    async def slow_to_clean(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:  # closing a worker's stream, say: it takes a moment
            await asyncio.sleep(0.05)
            cleaned.append(scope["path"])

    http = HttpServer(slow_to_clean)
    port = await http.listen("127.0.0.1", 0)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /busy HTTP/1.1\r\nhost: x\r\n\r\n")
    await started.wait()
    await http.shutdown(0)
    assert cleaned == ["/busy"]  # what the app used can be closed now
    writer.close()


async def test_a_request_that_arrives_whole_never_makes_a_wait_event() -> None:
    """receive() makes its Event only when it has to wait: a request whose body came with
    its head (most of them) costs none; one whose body comes later still gets it."""
    events: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive, 1 << 20, None)
        events.append(receive.__self__.event)  # type: ignore[attr-defined]
        await send_bytes(send, 200, body, [])

    http = HttpServer(app, keep_alive_secs=60)
    port = await http.listen("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
    await reader.readuntil(b"hi")
    writer.write(b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nla")
    await writer.drain()
    async with asyncio.timeout(5):  # the app waits for the rest of the body
        while not any(conn.body_wait_since for conn in http.connections):
            await asyncio.sleep(0.005)
    writer.write(b"ter")
    await reader.readuntil(b"later")
    writer.close()
    await http.shutdown(1)
    assert events[0] is None and isinstance(events[1], asyncio.Event)


async def test_a_served_request_leaves_nothing_for_the_cyclic_garbage_collector(
    server: int,
) -> None:
    """Everything a request made is freed by reference counting as it ends. A reference
    loop (the scope holding the cycle as its body sink, the cycle holding the scope) kept
    every request's objects for the cyclic collector, whose passes took the p99 latency at
    32 connections from ~1 ms to 17-45 ms (bench/proxy_bench.py)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server)

    async def one(i: int) -> None:
        body = b"n=%d" % i
        writer.write(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)

    await one(0)  # warm: the connection's own objects are made
    gc.collect()
    gc.disable()
    try:
        for i in range(1, 201):
            await one(i)
        found = gc.collect()
    finally:
        gc.enable()
    writer.close()
    assert found < 50, found  # 200 requests; with the loop: several thousand objects


async def test_connections_to_one_address_share_its_tuple_in_their_scope() -> None:
    """Every connection keeps its local address for its scope's ``server``: one tuple per
    address, not per connection (~140 bytes of each of 10,000 held streams)."""
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["server"])
        await send_bytes(send, 200, b"ok", [])

    http = HttpServer(app, keep_alive_secs=60)
    port = await http.listen("127.0.0.1", 0)
    for _ in range(3):
        await read_until_closed(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    await http.shutdown(1)
    assert seen == [("127.0.0.1", port)] * 3
    assert seen[0] is seen[1] is seen[2]
