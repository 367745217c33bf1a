"""Our HTTP/1.1 server (server/http11.py) against what h11, uvicorn, aiohttp and hyper do.

Each test's docstring states which of those libraries behaves as the test demands (facts
read from their code or observed by feeding them the same bytes). Every case runs against an
in-process ``HttpServer`` on a real socket on 127.0.0.1; responses are parsed by h11's
client, which is strict about framing, so a response it accepts is a well-framed one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest

from shunter.sim.send import send_bytes
from shunter.wire.asgi import ClientGone, Message, Receive, Scope, Send, read_body
from shunter.wire.limits import ServerLimits
from shunter.wire.server import HttpServer

# --- the app, the server, the client -------------------------------------------------------


class EchoApp:
    """Echoes method, path and body, and records what it saw.

    /stream answers without a Content-Length (chunked); /wait answers once ``release`` is
    set; /no-read answers without reading the body.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.gone = asyncio.Event()  # set when receive() said http.disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        self.started.set()
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one", b"two"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/wait":
            await self.release.wait()
        if scope["path"] != "/no-read":
            try:
                body = await read_body(receive, 1 << 20, None)
            except ClientGone:
                self.gone.set()
                await send_bytes(send, 200, b"sent after the client was gone")
                return
        else:
            body = b""
        reply = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body)
        await send_bytes(send, 200, reply, [(b"content-type", b"text/plain")])


@asynccontextmanager
async def serving(app: object, limits: ServerLimits | None = None) -> AsyncIterator[int]:
    http = HttpServer(app, keep_alive_secs=60, limits=limits)  # type: ignore[arg-type]
    port = await http.listen("127.0.0.1", 0)
    try:
        yield port
    finally:
        await http.shutdown(1)


@pytest.fixture
def app() -> EchoApp:
    return EchoApp()


@pytest.fixture
async def port(app: EchoApp) -> AsyncIterator[int]:
    async with serving(app) as bound:
        yield bound


async def talk(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send ``raw``, then read until the server closes (failing if it does not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    informational: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None


def replies(data: bytes, methods: Sequence[str], closed: bool = True) -> list[Reply]:
    """Parse the responses to requests made with ``methods`` (in order) with h11's client.

    h11 raises on anything badly framed; with ``closed`` the data ended with the server
    closing, and nothing may follow the last response.
    """
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if closed:
        conn.receive_data(b"")
    out: list[Reply] = []
    for i, method in enumerate(methods):
        if i:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        informational: list[int] = []
        reply: Reply | None = None
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                reply = Reply(event.status_code, list(event.headers), informational=informational)
            elif isinstance(event, h11.Data):
                assert reply is not None
                reply.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"response {i} incomplete: {event!r}")
        assert reply is not None
        out.append(reply)
    if closed:
        assert conn.trailing_data == (b"", True), "bytes after the last response"
    return out


def request(path: str = "/", *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: x", *headers]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head_of_size(size: int) -> bytes:
    """A GET whose head (request line to the final CRLF, included) is ``size`` bytes, in
    headers of at most 4 KiB each."""
    start = b"GET / HTTP/1.1\r\nhost: x\r\n"
    fill = size - len(start) - 2
    lines: list[bytes] = []
    while fill:
        line = min(fill, 4096)
        if 0 < fill - line < 8:  # keep room for one more minimal header line
            line -= 8
        name = b"x-%d: " % len(lines)
        lines.append(name + b"v" * (line - len(name) - 2) + b"\r\n")
        fill -= line
    raw = start + b"".join(lines) + b"\r\n"
    assert len(raw) == size
    return raw


def is_refusal(data: bytes, status: int) -> Reply:
    """The data is exactly one ``status`` response with a short text body, then the close."""
    [reply] = replies(data, ["GET"])
    assert reply.status == status, data[:200]
    assert reply.header(b"connection") == b"close"
    assert reply.body and (reply.header(b"content-type") or b"").startswith(b"text/plain")
    return reply


# --- head limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "status"), [(64 * 1024, 200), (64 * 1024 + 1, 431)])
async def test_a_head_over_64_kib_is_431(app: EchoApp, port: int, size: int, status: int) -> None:
    """hyper answers a head over its buffer limit with 431 and closes; h11 refuses a head
    over 16 KiB with error_status_hint 431 (uvicorn on h11 sends that as 400). Ours: 64 KiB."""
    data = await talk(port, head_of_size(size) + request("/next", "connection: close"))
    if status == 431:
        is_refusal(data, 431)
        assert app.paths == []
    else:
        assert [r.status for r in replies(data, ["GET", "GET"])] == [200, 200]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(("line", "status"), [(8190, 200), (8191, 414)])
async def test_a_request_line_over_8190_bytes_is_414(
    app: EchoApp, port: int, method: str, line: int, status: int
) -> None:
    """aiohttp refuses a request line over max_line_size (8190 bytes) with 400; hyper answers
    a target over its own limit (65534 bytes) with 414. Ours: aiohttp's limit, hyper's 414."""
    target = "/" + "a" * (line - len(f"{method} / HTTP/1.1"))
    raw = f"{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
    assert len(raw.split(b"\r\n")[0]) == line
    data = await talk(port, raw)
    if status == 414:
        is_refusal(data, 414)
        assert app.paths == []
    else:
        assert replies(data, [method])[0].status == 200


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431)])
async def test_more_than_100_headers_is_431(
    app: EchoApp, port: int, count: int, status: int
) -> None:
    """hyper refuses more than 100 headers (its default max_headers) with 431; aiohttp
    refuses more than its max_headers (128) with 400."""
    headers = [f"x-{i}: v" for i in range(count - 2)]  # with host and connection
    data = await talk(port, request("/", "connection: close", *headers))
    if status == 431:
        is_refusal(data, 431)
        assert app.paths == []
    else:
        assert replies(data, ["GET"])[0].status == 200


@pytest.mark.parametrize(("size", "status"), [(8190, 200), (8191, 431)])
async def test_one_header_over_8190_bytes_is_431(port: int, size: int, status: int) -> None:
    """aiohttp refuses a header line over max_field_size (8190 bytes) with 400 (LineTooLong);
    we answer 431, the status RFC 6585 has for it. Counted: name and value."""
    header = "x-big: " + "v" * (size - len("x-big"))
    data = await talk(port, request("/", "connection: close", header))
    if status == 431:
        is_refusal(data, 431)
    else:
        assert replies(data, ["GET"])[0].status == 200


@pytest.mark.parametrize(
    ("second", "status"),
    [
        (request("/" + "a" * 8200), 414),
        (request("/", "x-big: " + "v" * 8200), 431),
        (request("/", *(f"x-{i}: v" for i in range(101))), 431),
    ],
)
async def test_limits_hold_for_a_head_that_shares_a_read_with_the_one_before(
    app: EchoApp, port: int, second: bytes, status: int
) -> None:
    """h11 applies its limits to each request of a pipeline alike; so do we, also to a head
    that arrives in the same read as the end of the request before it."""
    data = await talk(port, request("/first") + second)
    first, refused = replies(data, ["GET", "GET"])
    assert first.body == b"GET /first "
    assert refused.status == status and refused.header(b"connection") == b"close"
    assert app.paths == ["/first"]


async def test_a_huge_header_in_pieces_is_refused_before_it_ends(app: EchoApp, port: int) -> None:
    """h11 raises 'Receive buffer too long' (hint 431) as soon as its buffer passes the
    limit, without waiting for the line to end: so do we, at 64 KiB."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-huge: ")
    for _ in range(64):  # 256 KiB, never ending the line
        writer.write(b"v" * 4096)
        await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    is_refusal(data, 431)
    assert app.paths == []


async def test_too_many_headers_are_refused_before_the_head_ends(app: EchoApp, port: int) -> None:
    """aiohttp raises 'Too many headers received' as the lines come, not at the head's end,
    so a client cannot make it hold thousands of small headers: neither can it make us."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = b"".join(b"x-%d: v\r\n" % i for i in range(200))
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n" + headers)  # and never the end of the head
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    is_refusal(data, 431)
    assert app.paths == []


async def test_trailers_count_against_the_head_limit(app: EchoApp, port: int) -> None:
    """h11 buffers trailers under the same 16 KiB limit as the head; aiohttp counts them
    against max_headers. Ours: 64 KiB of chunk lines and trailers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("/", "transfer-encoding: chunked", method="POST") + b"3\r\nabc\r\n0\r\n")
    writer.write(b"x-trailer: ")
    for _ in range(32):  # 128 KiB of one trailer that never ends
        writer.write(b"t" * 4096)
        await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    is_refusal(data, 431)


# --- deadlines ---------------------------------------------------------------------------------

FAST = ServerLimits(request_head_timeout_secs=0.3, request_body_timeout_secs=0.3)


@pytest.mark.parametrize("prefix", [b"", b"\r\n"])
async def test_a_head_sent_byte_by_byte_gets_408(app: EchoApp, prefix: bytes) -> None:
    """hyper's header_read_timeout (30 s by default) runs from the first byte of a head to
    its end, whatever trickles in, then closes the connection; we also say why, with 408.
    Empty lines before a request line (which h11 skips) count as part of the head."""
    async with serving(app, FAST) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = prefix + b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: " + b"s" * 1000

        async def trickle() -> None:
            for byte in raw:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

        sender = asyncio.ensure_future(trickle())
        data = await asyncio.wait_for(reader.read(), 5)
        sender.cancel()
        writer.close()
    is_refusal(data, 408)
    assert app.paths == []


async def test_a_stalled_body_gets_408_and_the_app_sees_a_disconnect(app: EchoApp) -> None:
    """nginx's client_body_timeout bounds the wait between two body reads and answers 408
    (h11, uvicorn and aiohttp have no such deadline). The app's receive() returns
    http.disconnect, as uvicorn's does once the connection is gone, and what the app sends
    afterwards never reaches the wire."""
    async with serving(app, FAST) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/", "content-length: 10", method="POST") + b"abc")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.wait_for(app.gone.wait(), 5)
    reply = is_refusal(data, 408)
    assert b"sent after" not in data and b"sent after" not in reply.body


async def test_an_idle_keep_alive_connection_is_not_a_slow_head(app: EchoApp) -> None:
    """uvicorn closes a kept-alive connection idle between requests by its keep-alive
    timeout, not as a slow request: the head deadline starts with a head's first byte."""
    async with serving(app, FAST) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/one"))
        await reader.readuntil(b"GET /one ")
        await asyncio.sleep(0.8)  # the time under test: over twice the head deadline
        writer.write(request("/two", "connection: close"))
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert replies(data, ["GET"])[0].body == b"GET /two "


async def test_a_head_waiting_behind_a_slow_response_is_not_timed_out(app: EchoApp) -> None:
    """uvicorn on h11 pauses reading while a response is in progress (h11 returns PAUSED),
    so a next request's time cannot run out meanwhile. We read ahead, so a head's time
    restarts when the response before it ends."""
    async with serving(app, ServerLimits(request_head_timeout_secs=0.6)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/wait") + b"GET /after HTTP/1.1\r\n")
        await app.started.wait()
        await asyncio.sleep(1.3)  # the time under test: over twice the head deadline
        app.release.set()
        await reader.readuntil(b"GET /wait ")
        await asyncio.sleep(0.3)  # half the deadline, counted from the end of the response
        writer.write(b"host: x\r\nconnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert replies(data, ["GET"])[0].body == b"GET /after "


async def test_connections_over_the_cap_get_503_and_one_warning(
    app: EchoApp, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's --limit-concurrency answers 503 once that many connections are open; we
    answer at once, before reading, and log it, but not once per refused connection."""
    async with serving(app, ServerLimits(max_connections=2)) as port:
        kept = []
        for i in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(f"/{i}"))
            await reader.readuntil(b"GET /%d " % i)
            kept.append(writer)
        with caplog.at_level(logging.WARNING, logger="shunter.http"):
            for _ in range(3):
                data = await talk(port, b"")
                is_refusal(data, 503)
        warnings = [r for r in caplog.records if "connection limit" in r.getMessage()]
        assert len(warnings) == 1
        kept.pop().close()
        for _ in range(200):  # the server sees the close, then has room again
            data = await talk(port, request("/again", "connection: close"))
            if data.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.01)
        assert replies(data, ["GET"])[0].body == b"GET /again "
        for writer in kept:
            writer.close()


# --- HEAD --------------------------------------------------------------------------------------


async def test_head_gets_the_head_without_the_body(port: int) -> None:
    """uvicorn never writes a body for HEAD (it drops the app's) and keeps the Content-Length
    the app set; h11 refuses body bytes for a HEAD response. The next pipelined request is
    read normally."""
    raw = request("/h", method="HEAD") + request("/g", "connection: close")
    data = await talk(port, raw)
    head, get = replies(data, ["HEAD", "GET"])
    assert head.status == 200 and head.body == b""
    assert head.header(b"content-length") == b"%d" % len(b"HEAD /h ")
    assert get.body == b"GET /g "


async def test_head_of_a_streamed_response_has_no_chunked_framing(port: int) -> None:
    """uvicorn adds transfer-encoding: chunked only when the method is not HEAD (h11 adds it
    to the head, but writes no body either). The connection stays usable."""
    raw = request("/stream", method="HEAD") + request("/g", "connection: close")
    data = await talk(port, raw)
    head, get = replies(data, ["HEAD", "GET"])
    assert head.header(b"transfer-encoding") is None and head.body == b""
    assert b"one" not in data
    assert get.body == b"GET /g "


# --- pipelining ----------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(app: EchoApp, port: int) -> None:
    """h11 and uvicorn answer pipelined requests one at a time, in the order received,
    even when the first is the slowest."""
    raw = request("/wait") + request("/fast") + request("/last", "connection: close")
    done = asyncio.ensure_future(talk(port, raw))
    await app.started.wait()
    await asyncio.sleep(0.05)
    assert app.paths == ["/wait"]  # one at a time
    app.release.set()
    bodies = [r.body for r in replies(await done, ["GET"] * 3)]
    assert bodies == [b"GET /wait ", b"GET /fast ", b"GET /last "]


async def test_a_malformed_request_behind_a_valid_one_does_not_cut_its_response(
    app: EchoApp, port: int
) -> None:
    """uvicorn on h11 answers the valid request in full, then 400s the bad one: h11 parses
    the next request only once the exchange before it is done."""
    done = asyncio.ensure_future(talk(port, request("/wait") + b"NOT HTTP AT ALL\r\n\r\n"))
    await app.started.wait()
    app.release.set()
    data = await done
    valid, refused = replies(data, ["GET", "GET"])
    assert (valid.status, valid.body) == (200, b"GET /wait ")
    assert refused.status == 400 and refused.header(b"connection") == b"close"
    assert app.paths == ["/wait"]


# --- framing -----------------------------------------------------------------------------------

FRAMING_REFUSED = {
    "content-length and transfer-encoding together": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        "aiohttp: 'Transfer-Encoding can't be present with Content-Length' (h11 lets chunked win)",
    ),
    "two different content-lengths": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        "h11: 'conflicting Content-Length headers'; aiohttp: duplicate content-length",
    ),
    "negative content-length": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -3\r\n\r\nabc",
        "h11: 'bad Content-Length'; aiohttp: invalid header",
    ),
    "non-numeric content-length": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3a\r\n\r\nabc",
        "h11: 'bad Content-Length'; aiohttp: invalid header",
    ),
    "transfer-encoding gzip": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nabc",
        "h11: 'Only Transfer-Encoding: chunked is supported' (501); aiohttp: 400",
    ),
    "transfer-encoding chunked, gzip": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        "h11: only chunked is supported (501); aiohttp: 'Request has invalid Transfer-Encoding'",
    ),
    "obs-fold continuation line": (
        b"GET / HTTP/1.1\r\nhost: x\r\nx-a: one\r\n two\r\n\r\n",
        "aiohttp: invalid header b' two' (h11 unfolds it; RFC 9112 lets a server reject it)",
    ),
    "bare LF line ends": (
        b"GET / HTTP/1.1\nhost: x\n\n",
        "aiohttp: 'Bad line ending, expected CRLF' (h11 accepts bare LF)",
    ),
    "NUL in a header value": (
        b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n",
        "h11: 'illegal header line'; aiohttp: invalid header",
    ),
    "space before the colon": (
        b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
        "h11: 'illegal header line'; aiohttp: invalid header (RFC 9112 §5.1: MUST reject)",
    ),
    "a request target that is not a URL": (
        b"GET http://[ HTTP/1.1\r\nhost: x\r\n\r\n",
        "aiohttp: InvalidURLError (400)",
    ),
}


@pytest.mark.parametrize("case", list(FRAMING_REFUSED))
async def test_framing_that_h11_or_aiohttp_refuses_gets_400(
    app: EchoApp, port: int, case: str
) -> None:
    """aiohttp refuses each case with 400 (h11 too where the case's note says so); we answer
    400 with a short text body, close, and never run the app."""
    raw, _fact = FRAMING_REFUSED[case]
    data = await talk(port, raw)
    is_refusal(data, 400)
    assert app.paths == []


async def test_an_invalid_chunk_size_gets_400(port: int) -> None:
    """h11: 'illegal chunk header' (400); aiohttp: TransferEncodingError (400). The app may
    have started; it sees http.disconnect, and the client gets the 400, not silence."""
    raw = request("/", "transfer-encoding: chunked", method="POST") + b"zz\r\nabc\r\n0\r\n\r\n"
    is_refusal(await talk(port, raw), 400)


async def test_a_chunk_extension_is_ignored(port: int) -> None:
    """h11 and aiohttp accept and ignore chunk extensions (RFC 9112 §7.1.1)."""
    raw = (
        request("/", "transfer-encoding: chunked", "connection: close", method="POST")
        + b"3;name=value\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n"
    )
    assert replies(await talk(port, raw), ["POST"])[0].body == b"POST / abcde"


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            b"upgrades are not supported",
        ),
        (b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n", b"invalid url"),
    ],
)
async def test_an_upgrade_or_connect_gets_400(
    app: EchoApp, port: int, raw: bytes, said: bytes
) -> None:
    """uvicorn and h11 would answer an Upgrade request as plain HTTP and ignore the upgrade;
    our parser stops at an upgrade (what follows is not HTTP), so we answer 400 and close
    rather than leave the client with silence. aiohttp parses CONNECT as an upgrade too;
    its authority-form target fails our URL parse first, which is a 400 as well."""
    reply = is_refusal(await talk(port, raw), 400)
    assert said in reply.body
    assert app.paths == []


# --- keep-alive ----------------------------------------------------------------------------


async def test_http11_keeps_the_connection_unless_told_to_close(port: int) -> None:
    """h11: HTTP/1.1 is persistent by default; 'connection: close' from the client gets
    'connection: close' back and the close."""
    data = await talk(port, request("/a") + request("/b", "connection: close"))
    first, last = replies(data, ["GET", "GET"])
    assert first.header(b"connection") is None
    assert last.header(b"connection") == b"close"


async def test_http10_keep_alive_is_announced_when_kept(port: int) -> None:
    """aiohttp answers an HTTP/1.0 request that asked for keep-alive with
    'Connection: keep-alive' when it keeps the connection (without it an HTTP/1.0 client
    assumes the close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"\r\nconnection: keep-alive\r\n" in head
    await reader.readexactly(len(b"GET /a "))
    writer.write(b"GET /b HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"\r\nconnection: close\r\n" in data and data.endswith(b"GET /b ")


# --- Expect: 100-continue ------------------------------------------------------------------


async def test_100_continue_comes_when_the_app_reads_the_body(port: int) -> None:
    """uvicorn (on httptools or h11) writes '100 Continue' when the app first calls
    receive()."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("/", "content-length: 2", "expect: 100-continue", method="POST"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_no_100_continue_when_the_app_answers_without_the_body(port: int) -> None:
    """h11 stops offering 100 Continue once the response starts; uvicorn too. The
    client may then never send the body, so the connection cannot be reused: the response
    says so (connection: close) and the connection is closed."""
    raw = request("/no-read", "content-length: 5", "expect: 100-continue", method="POST")
    data = await talk(port, raw)
    [reply] = replies(data, ["POST"])
    assert reply.informational == [] and reply.status == 200
    assert reply.header(b"connection") == b"close"


# --- what the app sends --------------------------------------------------------------------


def app_sending(headers: list[tuple[bytes, bytes]], *bodies: bytes) -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, body in enumerate(bodies):
            more = i < len(bodies) - 1
            message: Message = {"type": "http.response.body", "body": body, "more_body": more}
            await send(message)

    return app


@pytest.mark.parametrize(
    "headers",
    [
        [(b"bad name", b"v")],
        [(b"x-a", b"one\r\nx-injected: yes")],
        [(b"x-a", b"nul\x00")],
        [(b"x-a", b"fine"), (b"x-b", b"bare\rcr")],
        [(b"x-a", b"del\x7f"), (b"x-b", b"fine")],
        [(b"content-length", b"abc")],
        [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
    ],
)
async def test_an_invalid_response_header_is_a_500(
    headers: list[tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn refuses a header name matching HEADER_RE or a value matching HEADER_VALUE_RE
    (RuntimeError, then 500 when nothing was sent, with the error logged)."""
    with caplog.at_level(logging.ERROR, logger="shunter.http"):
        async with serving(app_sending(headers, b"abc")) as port:
            data = await talk(port, request("/"))
    is_refusal(data, 500)
    assert b"injected" not in data
    assert any("error in ASGI application" in r.getMessage() for r in caplog.records)


async def test_a_tab_in_a_response_header_value_is_kept() -> None:
    """HTAB is the one control byte a field value may hold (RFC 9110 5.5)."""
    async with serving(app_sending([(b"x-a", b"one\ttwo")], b"abc")) as port:
        data = await talk(port, request("/", "connection: close"))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nx-a: one\ttwo\r\n" in data


async def test_header_names_are_compared_without_case(port: int) -> None:
    """uvicorn lower-cases names before comparing content-length, connection and
    transfer-encoding: an app's 'Content-Length' is not followed by chunked framing, and
    its 'Connection: Close' closes."""
    headers = [(b"Content-Length", b"3"), (b"Connection", b"Close")]
    async with serving(app_sending(headers, b"abc")) as port:
        data = await talk(port, request("/"))
    assert b"transfer-encoding" not in data.lower()
    assert data.lower().count(b"connection:") == 1
    assert data.endswith(b"\r\n\r\nabc")


async def test_a_body_longer_than_its_content_length_is_an_error() -> None:
    """uvicorn: 'Response content longer than Content-Length' (RuntimeError): nothing past
    the declared length is written; here nothing was written yet, so it is a 500."""
    async with serving(app_sending([(b"content-length", b"3")], b"abcdef")) as port:
        data = await talk(port, request("/"))
    is_refusal(data, 500)
    assert b"abcdef" not in data


async def test_a_body_running_past_its_length_later_is_cut_and_closed() -> None:
    """uvicorn raises on the message that overflows; what was within the length was sent,
    so the connection is closed after it."""
    async with serving(app_sending([(b"content-length", b"3")], b"ab", b"cd")) as port:
        data = await talk(port, request("/"))
    assert data.endswith(b"\r\n\r\nab")


async def test_a_response_ending_short_closes_the_connection() -> None:
    """uvicorn raises 'Response content shorter than Content-Length' and closes: the client
    must not wait for bytes that will never come on a reused connection."""
    async with serving(app_sending([(b"content-length", b"10")], b"abc")) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/"))
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert data.endswith(b"\r\n\r\nabc")


async def test_an_app_chunked_header_gets_our_chunk_framing_once() -> None:
    """uvicorn takes an app's 'transfer-encoding: chunked' as the framing to apply (and
    adds no second one)."""
    headers = [(b"transfer-encoding", b"chunked")]
    async with serving(app_sending(headers, b"ab", b"cd", b"")) as port:
        data = await talk(port, request("/", "connection: close"))
    [reply] = replies(data, ["GET"])
    assert reply.body == b"abcd" and data.lower().count(b"transfer-encoding") == 1
