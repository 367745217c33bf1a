"""The peer channel with a shared secret (``peers/security.py``), on real ZeroMQ sockets on
127.0.0.1: gateways with the same secret hear each other; one with another secret, or none,
neither hears nor is heard, and the failed handshakes are counted and logged."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import zmq
from test_peer_transport import heard

from shunter.peers.security import (
    MIN_SECRET_BYTES,
    SECRET_ENV,
    PeerKeys,
    PeerSecretError,
    load_secret,
)
from shunter.peers.transport import PeerSockets

from support.harness import free_port

HOST = "127.0.0.1"
SECRET = b"0123456789abcdef-the-peer-secret"


def pair(a_keys: PeerKeys | None, b_keys: PeerKeys | None) -> tuple[PeerSockets, PeerSockets]:
    """A subscribed to B; B's PUB and A's SUB secured with the keys given."""
    a_port, b_port = free_port(), free_port()
    b = PeerSockets(f"{HOST}:{b_port}", [], b_keys)
    a = PeerSockets(f"{HOST}:{a_port}", [f"{HOST}:{b_port}"], a_keys)
    return a, b


async def never_heard(listener: PeerSockets, speaker: PeerSockets, seconds: float) -> bool:
    """Whether ``listener`` receives nothing ``speaker`` sends for ``seconds``."""
    got: list[list[bytes]] = []
    listener.listen(got.append)
    for _ in range(int(seconds / 0.05)):
        speaker.send([b"secret routing state"])
        await asyncio.sleep(0.05)
    return not got


async def failures(sockets: PeerSockets, at_least: int = 1) -> int:
    async with asyncio.timeout(5):
        while sockets.handshake_failures < at_least:
            await asyncio.sleep(0.02)
    return sockets.handshake_failures


async def test_gateways_sharing_the_secret_hear_each_other() -> None:
    keys = PeerKeys.from_secret(SECRET)
    a, b = pair(keys, keys)
    try:
        assert b"hello" in await heard(a, b, b"hello")
        assert a.handshake_failures == b.handshake_failures == 0
    finally:
        a.close()
        b.close()


async def test_another_secret_is_neither_heard_nor_told_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pair(PeerKeys.from_secret(b"another secret, long enough"), PeerKeys.from_secret(SECRET))
    try:
        with caplog.at_level(logging.WARNING, "shunter.peers"):
            b.listen(lambda frames: None)
            assert await never_heard(a, b, 0.5)
            await failures(a)
        assert any("peer handshake failed" in r.getMessage() for r in caplog.records)
    finally:
        a.close()
        b.close()


async def test_a_subscriber_without_the_secret_reads_nothing() -> None:
    a, b = pair(None, PeerKeys.from_secret(SECRET))  # an eavesdropper in the clear
    try:
        b.listen(lambda frames: None)
        assert await never_heard(a, b, 0.5)
        assert await failures(b) >= 1  # the secured side saw the plain handshake fail
    finally:
        a.close()
        b.close()


async def test_a_publisher_without_the_secret_cannot_feed_a_secured_gateway() -> None:
    a, b = pair(PeerKeys.from_secret(SECRET), None)  # an impostor at a peer's address
    try:
        b.listen(lambda frames: None)
        assert await never_heard(a, b, 0.5)
        assert await failures(a) >= 1
    finally:
        a.close()
        b.close()


def test_every_gateway_derives_the_same_keys_from_one_secret() -> None:
    one, two = PeerKeys.from_secret(SECRET), PeerKeys.from_secret(SECRET)
    assert one == two
    assert PeerKeys.from_secret(SECRET + b"!") != one
    assert zmq.curve_public(one.secret) == one.public


def test_the_secret_comes_from_the_file_else_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert load_secret(str(path), {}) == SECRET  # the trailing newline dropped
    assert load_secret(None, {SECRET_ENV: "x" * MIN_SECRET_BYTES}) == b"x" * MIN_SECRET_BYTES
    assert load_secret(None, {}) is None


def test_an_unusable_secret_is_refused_with_the_reason(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(PeerSecretError, match="at least 16 bytes"):
        load_secret(str(short), {})
    with pytest.raises(PeerSecretError, match=r"SHUNTER_PEER_SECRET.*at least 16 bytes"):
        load_secret(None, {SECRET_ENV: "short"})
    with pytest.raises(PeerSecretError, match="No such file"):
        load_secret(str(tmp_path / "missing"), {})


async def links_become(sockets: PeerSockets, peer: str, state: str) -> None:
    async with asyncio.timeout(5):
        while sockets.links.get(peer) != state:
            await asyncio.sleep(0.02)


async def test_each_peers_link_is_known_connected_retrying_or_refused() -> None:
    keys = PeerKeys.from_secret(SECRET)
    down = f"{HOST}:{free_port()}"  # nobody listens there
    b_port = free_port()
    b = PeerSockets(f"{HOST}:{b_port}", [], keys)
    stranger_port = free_port()
    stranger = PeerSockets(f"{HOST}:{stranger_port}", [], PeerKeys.from_secret(b"x" * 20))
    a = PeerSockets(
        f"{HOST}:{free_port()}", [f"{HOST}:{b_port}", down, f"{HOST}:{stranger_port}"], keys
    )
    try:
        a.listen(lambda frames: None)
        assert set(a.links) == {f"{HOST}:{b_port}", down, f"{HOST}:{stranger_port}"}
        await links_become(a, f"{HOST}:{b_port}", "connected")
        await links_become(a, down, "retrying")  # ZeroMQ retries it with backoff
        await links_become(a, f"{HOST}:{stranger_port}", "refused")
        b.close()
        await links_become(a, f"{HOST}:{b_port}", "retrying")  # the peer went away
        a.set_found(frozenset())
        assert f"{HOST}:{b_port}" in a.links  # a peer named at start stays listed
    finally:
        for sockets in (a, stranger):
            sockets.close()


def test_a_failed_start_leaves_no_socket_or_thread_behind() -> None:
    taken = PeerSockets(f"{HOST}:{free_port()}", [], PeerKeys.from_secret(SECRET))
    bind = taken.pub.getsockopt(zmq.LAST_ENDPOINT).decode().removeprefix("tcp://")  # type: ignore[union-attr]
    threads = threading.active_count()
    try:
        with pytest.raises(zmq.ZMQError):
            PeerSockets(bind, [], PeerKeys.from_secret(SECRET))  # the port is taken
        assert threading.active_count() == threads  # the ZAP thread was stopped
    finally:
        taken.close()
