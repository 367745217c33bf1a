"""The few request fields routing needs, decoded without building the whole request.

A msgspec Struct that declares only these fields skips everything else in the body
(DESIGN §5: 187 ns for a 314-byte chat body against 533 ns for orjson.loads). The body's
bytes themselves are forwarded unchanged.
"""

from __future__ import annotations

import msgspec

from shunter.protocols.errors import ApiError


class RoutingFields(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None


_decoder = msgspec.json.Decoder(RoutingFields)


def decode_routing_fields(body: bytes) -> RoutingFields:
    """The routing fields of a JSON object body; raises a 400 ApiError otherwise."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "json_parse_error", f"malformed JSON body: {exc}") from None
