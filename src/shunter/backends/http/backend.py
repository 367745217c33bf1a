"""A worker reached over HTTP: the client's bytes forwarded, the worker's bytes relayed.

The body goes to the worker as the client sent it (unknown fields included), unless a DP
rank or, for one leg of a prefill/decode pair, the bootstrap fields must be injected.
Headers are filtered on the way in (an allow-list, ``forwarding.py``) and out
(``relayed_headers``); a stream's chunks are handed on as they arrive: the worker's
response is itself the reply's body (no generator of our own around it).

The data-plane client is created on first use by one task and read as an attribute after
(``aio/once.py``); a refused connection starts building a fresh one in the background while
requests keep using the old one, so a worker that restarted is reached again without being
re-added. What differs between engines (load, flush, generation check, ``/generate``) is
the ``Engine``'s business (``engines/``). A llama.cpp worker's requests for one prompt may
also take turns rather than evict each other's slots (``slot_turns.py``, opt-in).
"""

from __future__ import annotations

from collections.abc import Callable

from mypy_extensions import mypyc_attr

from shunter.aio.once import OnceCell
from shunter.backends.base import (
    SGLANG_ONLY_PATHS,
    Backend,
    ConnectionMode,
    EngineOpError,
    InfoKind,
    Load,
    Outbound,
    Target,
)
from shunter.backends.http.calls import WorkerCalls, bearer
from shunter.backends.http.engines.base import Engine
from shunter.backends.http.forwarding import (
    DEFAULT_RULE,
    PLAIN_CONNECTION,
    REQUEST_ID_PREFIX,
    ForwardRule,
)
from shunter.backends.http.messages import check_not_found, whole_body
from shunter.protocols.anthropic import MESSAGES_PATH
from shunter.protocols.reply import Headers, Reply
from shunter.protocols.tokenize import TOKEN_PATHS
from shunter.wire.base import HOP_BY_HOP, UpstreamClient, UpstreamError

_NOT_RELAYED = HOP_BY_HOP | {b"x-request-id"}
# Never relayed either: a worker's own CORS answer (SGLang and vLLM echo any origin, with
# credentials) would override the gateway's, which ``api/cors.py`` adds.
_CORS_PREFIX = b"access-control-"
_INFO_PATHS = {"server": "/get_server_info", "model": "/get_model_info"}
_JSON_SPACE = b" \t\r\n"
# Served by SGLang's own server only (vLLM's tokenize API has other paths and shapes).
_NATIVE_ONLY = SGLANG_ONLY_PATHS | TOKEN_PATHS


# Compiled (a mypyc build), a class refuses subclasses that are not compiled with it unless
# it allows them: llama.cpp's slot turns (slot_turns.py) are one, and so may a user's.
@mypyc_attr(allow_interpreted_subclasses=True)
class HttpBackend(Backend):
    mode = ConnectionMode.HTTP

    def __init__(
        self,
        engine: Engine,
        clients: OnceCell[UpstreamClient],
        calls: WorkerCalls,
        health_endpoint: str = "/health",
        forward: ForwardRule = DEFAULT_RULE,
    ) -> None:
        self.engine = engine
        self.runtime = engine.runtime
        self._clients = clients  # the data plane's, created on first use
        self._calls = calls  # the control plane's
        self._health_endpoint = health_endpoint
        self._forward = forward  # which client headers the worker receives

    def serves(self, path: str) -> bool:
        return path not in _NATIVE_ONLY or self.engine.native_generate

    # --- the data plane ------------------------------------------------------------------

    async def send(
        self, target: Target, request: Outbound, ended: Callable[[], None] | None = None
    ) -> Reply:
        """One attempt; ``ended`` (when given) is called once a streamed answer's body is
        over, however it ends (a whole answer is over when this returns)."""
        cell = self._clients
        client = cell.value or await cell.get()
        url = target.base_url + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        headers = forwarded_headers(request, target.api_key, self._forward)
        body = request.body
        if request.bootstrap is not None:
            body = request.bootstrap.into(body)
        if target.dp_rank is not None and body:  # bodiless: a stored response's GET
            body = with_rank(body, target.dp_rank)
        try:
            if request.stream:
                upstream = await client.stream(request.method, url, headers, body)
                if upstream.status == 404 and request.path == MESSAGES_PATH:
                    answer = await whole_body(upstream)
                    check_not_found(self.runtime, target, request, answer)
                    return Reply(404, relayed_headers(upstream.headers), answer)
                chunks = upstream.as_stream(ended)  # closing it closes the connection
                return Reply(upstream.status, relayed_headers(upstream.headers), chunks)
            response = await client.request(request.method, url, headers, body)
        except UpstreamError as exc:
            if exc.kind == "connect":
                # The worker may have restarted: build a fresh pool in the background;
                # requests keep using this one until it is ready, and those running on it
                # finish there (it is retired, not closed). A broken exchange ("io") says
                # nothing about the pool's other connections.
                cell.replace(client)
            raise
        if response.status == 404 and request.path == MESSAGES_PATH:
            check_not_found(self.runtime, target, request, response.body)
        return Reply(response.status, relayed_headers(response.headers), response.body)

    # --- the control plane -----------------------------------------------------------------

    async def probe(self, target: Target, timeout: float) -> str | None:
        return await probe_http(self._calls, target, self._health_endpoint)

    async def load(self, target: Target) -> Load:
        return await self.engine.load(self._calls, target)

    @property
    def can_flush(self) -> bool:
        return self.engine.can_flush

    async def flush(self, target: Target) -> None:
        await self.engine.flush(self._calls, target)

    async def health_generate(self, target: Target) -> bytes:
        return await self.engine.health_generate(self._calls, target)

    async def info(self, target: Target, kind: InfoKind, request_id: str) -> Reply:
        id_header = [(b"x-request-id", request_id.encode("latin-1"))]
        try:
            response = await self._calls.request(target, "GET", _INFO_PATHS[kind], None, id_header)
        except UpstreamError as exc:
            raise EngineOpError(str(exc), exc.kind) from None
        return Reply(response.status, relayed_headers(response.headers), response.body)

    async def metrics(self, target: Target) -> str | None:
        text = await self._calls.get(target, "/metrics")
        return None if text is None else text.decode("utf-8", "replace")

    async def close(self) -> None:
        await self._clients.close()


async def probe_http(calls: WorkerCalls, target: Target, endpoint: str) -> str | None:
    """``GET endpoint`` (``/health``): None when it answers 2xx, else what is wrong. Bounded by
    the control client's timeouts (the probe timeout)."""
    try:
        response = await calls.request(target, "GET", endpoint)
    except UpstreamError as exc:
        return str(exc)
    return None if 200 <= response.status < 300 else f"{endpoint} answered {response.status}"


def forwarded_headers(
    request: Outbound, api_key: str | None, rule: ForwardRule = DEFAULT_RULE
) -> Headers:
    """The headers the worker receives: the client's that ``rule`` allows (less any its
    ``Connection`` header names), the worker's own key (in place of the client's
    ``Authorization``), the request id and the gateway's trace context.

    One set lookup per header, and a ``startswith`` for those it misses: a typical
    8-header request takes ~1.3 µs, no more than the deny-list this replaced (which built
    a set per request for ``Connection: keep-alive``, ~2 µs)."""
    allowed = rule.sets[(api_key is not None) + 2 * (not request.trace)]
    headers: Headers = []
    connection = None
    for name, value in request.headers:
        if name in allowed or name.startswith(REQUEST_ID_PREFIX):
            headers.append((name, value))
        elif name == b"connection":
            connection = value
    if connection is not None and connection not in PLAIN_CONNECTION and headers:
        # A header the client's Connection names ends at this hop (RFC 9110 7.6.1).
        named = {token.strip().lower() for token in connection.split(b",")}
        headers = [(k, v) for k, v in headers if k not in named]
    if api_key is not None:
        headers += bearer(api_key)
    headers.append((b"x-request-id", request.request_id.encode("latin-1")))
    if request.trace:
        headers += request.trace
    return headers


def relayed_headers(headers: Headers) -> Headers:
    """The worker's response headers the client receives (the API adds the request id and
    its own CORS headers): the worker's pairs themselves, not copies, as a stream's reply
    keeps them for as long as it runs."""
    return [
        header
        for header in headers
        if header[0] not in _NOT_RELAYED and not header[0].startswith(_CORS_PREFIX)
    ]


def with_rank(body: bytes, rank: int) -> bytes:
    """The body with ``data_parallel_rank`` set: the one case where the gateway rewrites it.

    The field is spliced in before the closing brace, leaving every other byte as the
    client sent it: decoding and encoding again changed numbers (``1e400`` failed, integers
    past 64 bits came back as floats). The router routes only JSON objects, so the body
    ends with ``}``. A body that has the field already has it twice after this: JSON
    parsers (Python's, orjson, pydantic's) keep the last, the gateway's."""
    end = body.rstrip(_JSON_SPACE)
    assert end.endswith(b"}"), "the router routes JSON objects only"
    inner = end[:-1].rstrip(_JSON_SPACE)
    separator = b"" if inner.endswith(b"{") else b","  # only an empty object ends so
    return b'%s%s"data_parallel_rank":%d}' % (inner, separator, rank)
