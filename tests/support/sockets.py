"""Raw sockets for tests that speak HTTP/1.1 byte by byte."""

from __future__ import annotations

import asyncio


async def read_until_closed(port: int, raw: bytes) -> bytes:
    """Send ``raw`` to 127.0.0.1:``port`` and read until the server closes (5 s per read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 5):
        data += chunk
    writer.close()
    return data
