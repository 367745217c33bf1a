"""The error envelope: ``{"error": {"message", "type", "code"}}`` plus ``X-SMG-Error-Code``.

As smg does, ``type`` is the HTTP reason phrase and ``code`` a snake_case identifier; the
same code travels in the ``X-SMG-Error-Code`` header so metrics and clients can read it
without parsing the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import orjson

from shunter.protocols.reply import JSON_CONTENT, Reply


class ApiError(Exception):
    """An error the gateway answers itself."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": _reason(self.status), "code": self.code}}
        )


def invalid_request(message: str) -> ApiError:
    """A 400 for a body the gateway reads itself and finds wrong; ``message`` names the field."""
    return ApiError(400, "invalid_request", message)


def json_object(body: bytes) -> dict[str, Any]:
    """``body`` parsed as a JSON object, for the routes whose bodies the gateway reads whole
    (gRPC generation, Messages, tokenize); a 400 saying what is wrong otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "json_parse_error", f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object")
    return data


def flag(body: dict[str, Any], key: str, default: bool) -> bool:
    """``body[key]`` as a boolean (absent or null: ``default``); a 400 for anything else."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_request(f"'{key}' must be true or false")
    return value


def error_reply(error: ApiError) -> Reply:
    """The envelope as a reply, with its code in ``X-SMG-Error-Code`` too."""
    headers = [
        JSON_CONTENT,
        (b"x-smg-error-code", error.code.encode()),
        *error.headers,
    ]
    return Reply(error.status, headers, error.body())


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# What a client is told when a worker fails: the kind of failure, never the worker's address
# or the client library's wording (both stay in the gateway's log, with the request id).
_FAILURE_KINDS = {
    "connect": "the worker could not be reached",
    "timeout": "the worker did not answer in time",
    "io": "the connection to the worker broke",
    "oversize": "the worker's response is larger than the gateway accepts",
    "answer": "the worker answered with an error",
}


def upstream_failure(kind: str) -> str:
    """A client-safe description of a worker failure of ``kind`` (see UpstreamError)."""
    return _FAILURE_KINDS.get(kind, "the worker failed")


def stream_broken_event(kind: str) -> bytes:
    """The SSE event that tells a client its stream broke after the status was sent."""
    error = {
        "message": f"the worker stream broke: {upstream_failure(kind)}",
        "type": "Bad Gateway",
        "code": "upstream_stream_broken",
    }
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
