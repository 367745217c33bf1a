"""The control plane's requests to one HTTP worker: probes, load reads, flushes, info.

Each call carries the worker's own key (never the gateway's) and goes through the control
client, whose timeouts are the probe timeout's, so a stuck worker delays no check for long.
A generation check is the one control call that may take as long as a request: it uses the
worker's data-plane client instead (``long=True``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from shunter.backends.base import EngineOpError, Target
from shunter.protocols.reply import JSON_CONTENT
from shunter.wire.base import FullResponse, HeaderPairs, UpstreamError, WholeClient


def bearer(api_key: str | None) -> list[tuple[bytes, bytes]]:
    """The header that carries a worker's key, if it has one."""
    return [(b"authorization", b"Bearer " + api_key.encode("latin-1"))] if api_key else []


class WorkerCalls:
    def __init__(self, control: WholeClient, data: Callable[[], Awaitable[WholeClient]]) -> None:
        self._control = control
        self._data = data  # the worker's own client, for calls as long as a request
        # What an engine found out about this worker's endpoints (which of two answers, say),
        # kept as long as the worker, so that it is not probed for them on every call.
        self.found: dict[str, str] = {}

    async def request(
        self,
        target: Target,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: HeaderPairs = (),
        long: bool = False,
    ) -> FullResponse:
        """One call; raises UpstreamError when the worker gave no answer."""
        client = await self._data() if long else self._control
        all_headers = [*bearer(target.api_key), *headers]
        if body is not None:
            all_headers.append(JSON_CONTENT)
        return await client.request(method, target.base_url + path, all_headers, body)

    async def get(self, target: Target, path: str) -> bytes | None:
        """The body of a 200 answer to ``GET path``; None for any other outcome."""
        try:
            response = await self.request(target, "GET", path)
        except UpstreamError:
            return None
        return response.body if response.status == 200 else None

    async def get_json(self, target: Target, paths: Sequence[str]) -> Any:
        """The JSON of the first of ``paths`` answered 200 with JSON; None if none is."""
        for path in paths:
            body = await self.get(target, path)
            if body is not None:
                try:
                    return orjson.loads(body)
                except orjson.JSONDecodeError:
                    continue
        return None

    async def call(
        self, target: Target, method: str, path: str, body: bytes | None = None, long: bool = False
    ) -> bytes:
        """The body of a 2xx answer; EngineOpError saying what went wrong otherwise."""
        try:
            response = await self.request(target, method, path, body, long=long)
        except UpstreamError as exc:
            raise EngineOpError(str(exc), exc.kind) from None
        if not 200 <= response.status < 300:
            snippet = response.body[:200].decode("utf-8", "replace")
            raise EngineOpError(f"{method} {path}: status {response.status}: {snippet}")
        return response.body
