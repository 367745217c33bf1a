"""Client limits through a real gateway process: what a hostile client cannot make it hold."""

from __future__ import annotations

import asyncio

from support.harness import Gateway, Proc
from support.sockets import read_until_closed

REFUSED_WITHOUT_KEY = b"GET /workers HTTP/1.1\r\nhost: x\r\n"  # 401 when the head is fine


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_32_mib_header_is_refused_before_the_key_and_leaves_no_memory_behind(
    procs: list[Proc],
) -> None:
    """Before the head limits, one 32 MiB header was answered after the whole of it (and the
    gateway kept ~95 MiB). Now 431 comes after 64 KiB, before the API key is looked at, and
    the gateway's memory stays where it was."""
    gateway = Gateway("--api-key", "secret")
    procs.append(gateway)
    pid = gateway.popen.pid
    for _ in range(3):  # warm up the request path, so that it is not what grows
        warm_header = b"x-warm: %s\r\nconnection: close\r\n\r\n" % (b"w" * 8000)
        warm = await read_until_closed(gateway.port, REFUSED_WITHOUT_KEY + warm_header)
        assert warm.startswith(b"HTTP/1.1 401")
    before = rss_bytes(pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    # The answer's head is enough: the gateway may close while data is still coming.
    answer = asyncio.ensure_future(asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30))
    writer.write(REFUSED_WITHOUT_KEY + b"x-huge: ")
    piece = b"h" * 65536
    try:
        for _ in range(512):  # 32 MiB, stopping once the gateway has answered
            if answer.done():
                break
            writer.write(piece)
            await writer.drain()
        else:
            writer.write(b"\r\n\r\n")
    except ConnectionError:
        pass
    data = await answer
    writer.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:100]
    after = rss_bytes(pid)
    assert after - before < 4 * 1024 * 1024, (before, after)
