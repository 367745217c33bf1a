"""What gateway peers send each other: one versioned batch per flush, msgpack-encoded.

A message is two frames: the protocol version (2 bytes, big-endian) and the batch. The
version is read before anything else, so a peer speaking another version is refused (and
counted) without its batch being decoded against a schema it does not follow. Every batch
starts with the sender's hello (its node id and the models it serves): with PUB/SUB there
is no handshake, and carrying the hello in each batch (a few dozen bytes) means a peer that
joins or restarts needs no state machine to be recognised.

Structs are ``array_like`` (fields by position, no names on the wire): a decision costs its
model, worker URL, an 8-byte prefix reference and whatever prefix text is new.

What was added since version 1 went at the end of a struct, with a default (a worker's id,
a batch's responses, its settings): a peer that predates it skips the trailing items
(msgspec does) and one that has it reads an older peer's message as carrying none, so
gateways of both kinds keep talking during a rolling upgrade without a version change. A
change that altered the meaning of a field already there would take a new version.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1
_VERSION_BYTES = 2


class Hello(msgspec.Struct, array_like=True, frozen=True):
    node: str  # random per process start: tells peers apart, and a gateway its own echo
    models: list[str]  # the models this gateway serves (refused when disjoint from ours)


class Decision(msgspec.Struct, array_like=True, frozen=True):
    """A cache-aware routing decision: the prompt's leading blocks went to ``worker``.

    The prefix is ``base`` (a chain digest naming blocks sent before, 0 for none) followed
    by ``blocks`` (new text, whole blocks of ``prefixes.BLOCK_CHARS`` characters).
    """

    model: str
    worker: str
    base: int
    blocks: list[str]
    # A new prefix placed (not a match followed): the leader plans a rebalance soon after.
    # Last, with a default, as the module's docstring says.
    placed: bool = False


class ManualWorker(msgspec.Struct, array_like=True, frozen=True):
    """A worker's spec given by hand (``spec``: the ``POST /workers`` body, or a whole-spec
    ``PUT /workers/{id}``'s) or its removal (``None``); the change with the later ``(stamp,
    origin)`` wins."""

    url: str
    stamp: int  # wall-clock nanoseconds of the change, strictly increasing per origin
    origin: str  # the node where the change was made
    spec: bytes | None
    # The id the API gave it, so that every gateway answers for the same one. Last, with a
    # default: a peer that predates ids sends none, and ignores it when it comes.
    worker_id: str = ""


class WorkerSetting(msgspec.Struct, array_like=True, frozen=True):
    """One setting of a worker changed by hand in place (``PATCH /workers/{id}``, or a
    ``PUT`` without ``url``): ``field`` is one of ``fleet.spec.UPDATE_FIELDS``, ``key`` the
    label's name when it is ``labels`` (else empty), ``value`` as the API took it. Each
    ``(url, field, key)`` is a last-writer-wins register of its own, so changes of different
    settings made at once on two gateways both hold; a spec (``ManualWorker``) newer than a
    setting replaces it. 56-80 bytes each (msgpack, a 21-character URL)."""

    url: str  # the worker's registered URL
    stamp: int
    origin: str
    field: str
    key: str
    value: str | int | float | None  # None: only for api_key (the key removed)


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    """A Responses API response ``worker`` created and stores (``id``): the gateways send
    its ``GET``/``DELETE`` and its continuations there. ~80 bytes each."""

    id: str
    worker: str


class PromptMove(msgspec.Struct, array_like=True, frozen=True):
    """The leader's move of a prompt between workers (``policies/rebalance.py``): in
    ``model``'s tree, ``source``'s holdings of the branch ``text`` enters at character
    ``cut`` go to ``target``. Sent a few times a minute at most."""

    model: str
    source: str
    target: str
    cut: int
    text: str
    reason: str


class Batch(msgspec.Struct, array_like=True, frozen=True):
    hello: Hello
    decisions: list[Decision] = []
    workers: list[ManualWorker] = []
    # Last, so a peer that predates it ignores it (msgspec skips trailing array items) and
    # one that has it reads an older peer's batch as carrying none: no version change.
    responses: list[StoredResponse] = []
    settings: list[WorkerSetting] = []  # last, for the same reason
    moves: list[PromptMove] = []  # last, for the same reason


class MessageError(ValueError):
    """Not a batch of ours: malformed, or another protocol version (``version`` says)."""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Batch)
_VERSION = PROTOCOL_VERSION.to_bytes(_VERSION_BYTES, "big")


def encode(batch: Batch) -> list[bytes]:
    return [_VERSION, _encoder.encode(batch)]


def decode(frames: list[bytes]) -> Batch:
    """The batch in ``frames``; ``MessageError`` for anything else (never another error)."""
    if len(frames) != 2 or len(frames[0]) != _VERSION_BYTES:
        raise MessageError(f"expected 2 frames with a {_VERSION_BYTES}-byte version")
    version = int.from_bytes(frames[0], "big")
    if version != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {version}, ours is {PROTOCOL_VERSION}", version)
    try:
        return _decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"not a batch: {exc}") from None
