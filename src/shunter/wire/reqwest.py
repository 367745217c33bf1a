"""The upstream client on `pyreqwest` (Rust reqwest/hyper under asyncio).

The cheapest client measured for whole responses (43 µs of gateway CPU per proxied request,
against 84 µs for a tuned aiohttp and ~5 ms for httpx, in one benchmark run). It is not used
for streams: it costs a thread hop per chunk and ~64 KiB per open stream, and with its
default buffering it held SSE back until the stream ended; ``client.py`` relays streams.

Whole responses are read through pyreqwest's streamed API too, because its one-shot read
has no size limit: a worker could make us buffer any amount. See ``read_whole``.
"""

from __future__ import annotations

import io
import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    ConnectError,
    PyreqwestError,
    RequestTimeoutError,
)
from pyreqwest.response import Response

from shunter.wire.base import FullResponse, HeaderPairs, UpstreamError

# The largest whole response we expect is an embeddings batch: 2048 inputs (OpenAI's limit
# per request) of 4096 dimensions, written as JSON floats of ~21 bytes each, is ~172 MiB.
# 256 MiB passes that; it is held once (about 1.05x its size at peak, see ``read_whole``).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# A body of known length up to this is read in one call: fewer hops into pyreqwest for the
# common small answer. A bigger one is read chunk by chunk so it is held only once.
ONE_READ_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClientSettings:
    connect_timeout_secs: float = 10.0
    # Bounds the wait for the response head and each gap between body chunks, not the
    # length of a healthy stream (smg's total timeout cut long streams).
    read_timeout_secs: float = 1800.0
    pool_idle_timeout_secs: float = 50.0
    pool_max_idle_per_host: int = 512
    max_response_bytes: int = MAX_RESPONSE_BYTES  # a whole (non-streamed) response body
    client_cert_pem: bytes | None = None  # certificate + key, for mTLS to workers
    ca_certs_pem: tuple[bytes, ...] = ()
    ssl_context: ssl.SSLContext | None = None  # the same, for asyncio-based clients


def _translate(exc: PyreqwestError) -> UpstreamError:
    # Checked first: reqwest reports a read timeout while waiting for the response head as
    # a *connect* timeout, so every timeout is "timeout" (504), whatever its class says.
    if isinstance(exc, RequestTimeoutError):
        return UpstreamError("timeout", f"worker timed out: {exc}")
    if isinstance(exc, ConnectError):
        return UpstreamError("connect", f"cannot connect to worker: {exc}")
    return UpstreamError("io", f"worker connection failed: {exc}")


class UnsendableHeaders(ValueError):
    """A request header pyreqwest cannot send as it is (a value that is not UTF-8). Only
    the control plane's own headers (a request id, a validated key) come here, so this is a
    programming error; the data plane, which carries the client's header bytes, runs on
    ``wire/client.py``."""


def _byte_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """pyreqwest's header map as byte pairs (it speaks strings: the one conversion). It
    hands out only visible-ASCII values, and raises ValueError for any other."""
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def _str_pairs(headers: HeaderPairs) -> list[tuple[str, str]]:
    """Header values as the strings pyreqwest encodes back to the same bytes: it encodes
    them as UTF-8, so a value that is not UTF-8 cannot be sent exactly (UnicodeDecodeError)."""
    return [(k.decode("latin-1"), v.decode()) for k, v in headers]


def declared_length(response: Response) -> int | None:
    """The body length the worker declared (hyper has checked that it frames the body)."""
    declared = response.get_header("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def read_whole(response: Response, declared: int | None, limit: int) -> bytes:
    """The body of ``response``, refused once it is past ``limit`` bytes.

    A declared length over the limit is refused before any of the body is read; otherwise
    the running total is checked as chunks arrive, and the rest is never read. Chunks go
    into a ``BytesIO``, whose ``getvalue()`` hands over its own buffer (no copy) and grows
    by ``realloc``: a 200 MiB body peaks at ~210 MiB of RSS, where reading it in one call
    into Rust and copying it into ``bytes`` peaked at ~630 MiB (``bench/client_bench.py
    rss``), and it arrives in 0.5-0.7x the time (fewer copies).
    """
    if declared is not None and declared > limit:
        raise _too_large(limit)
    reader = response.body_reader
    buffer = io.BytesIO()
    total = 0
    while (chunk := await reader.read_chunk()) is not None:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        buffer.write(chunk)
    return buffer.getvalue()


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError("oversize", f"the worker's response exceeded {limit} bytes")


class ReqwestClient:
    """One worker's connection pool."""

    def __init__(self, settings: ClientSettings) -> None:
        builder = (
            ClientBuilder()
            .tcp_nodelay(True)
            .connect_timeout(timedelta(seconds=settings.connect_timeout_secs))
            .read_timeout(timedelta(seconds=settings.read_timeout_secs))
            .pool_idle_timeout(timedelta(seconds=settings.pool_idle_timeout_secs))
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .follow_redirects(False)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
        )
        if settings.client_cert_pem is not None:
            builder = builder.identity_pem(settings.client_cert_pem)
        for ca in settings.ca_certs_pem:
            builder = builder.add_root_certificate_pem(ca)
        self._client: Client = builder.build()
        self._max_response_bytes = settings.max_response_bytes
        self._one_read_bytes = min(ONE_READ_BYTES, settings.max_response_bytes)

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        try:
            builder = self._client.request(method, url).headers(_str_pairs(headers))
        except ValueError as exc:  # not UTF-8, or refused by pyreqwest
            raise UnsendableHeaders(
                f"a request header cannot go through pyreqwest: {exc}"
            ) from None
        if body is not None:
            builder = builder.body_bytes(body)
        context = builder.build_streamed()
        try:
            response = await context.__aenter__()
            try:
                headers_back = _byte_pairs(response.headers)
                declared = declared_length(response)
                if declared is not None and declared <= self._one_read_bytes:
                    payload = bytes(await response.bytes())  # the common, small answer
                else:
                    payload = await read_whole(response, declared, self._max_response_bytes)
            finally:
                await context.__aexit__(None, None, None)
        except PyreqwestError as exc:
            raise _translate(exc) from None
        except ValueError:  # a response header that is not visible ASCII
            raise UpstreamError("io", "the worker sent a header that is not ASCII") from None
        return FullResponse(response.status, headers_back, payload)

    async def close(self) -> None:
        await self._client.close()
