"""How two processes share a listening port: SO_REUSEPORT against one inherited socket.

Run: python bench/accept_spread.py [--trials 20] [--conns 32]

Each of two child processes runs a uvloop server that accepts connections and holds them,
either on a socket of its own bound with SO_REUSEPORT (what ``--workers`` does) or on one
listening socket the parent made and both inherited (the pre-fork way: every process
polls the same accept queue). A client then opens ``--conns`` connections at once, as a
load balancer's pool or wrk does, and each process says how many it got. Per trial, the
share of the busier process: 0.5 is even, 1.0 is one process taking everything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

CHILD = r"""
import asyncio, os, socket, sys, uvloop
mode, value, count_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
class Hold(asyncio.Protocol):
    def connection_made(self, transport):
        held.append(transport)
        os.write(count_fd, b".")
async def main():
    loop = asyncio.get_running_loop()
    if mode == "reuseport":
        await loop.create_server(Hold, "127.0.0.1", value, reuse_port=True, backlog=4096)
    else:
        await loop.create_server(Hold, sock=socket.socket(fileno=value), backlog=4096)
    os.write(count_fd, b"R")
    await asyncio.Event().wait()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def connect_all(port: int, conns: int) -> list[asyncio.StreamWriter]:
    pairs = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(conns))
    )
    return [writer for _reader, writer in pairs]


def trial(mode: str, conns: int) -> tuple[int, int]:
    port = free_port()
    shared = None
    if mode == "shared":
        shared = socket.socket()
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared.bind(("127.0.0.1", port))
        shared.listen(4096)
        shared.set_inheritable(True)
    pipes, procs = [], []
    for _ in range(2):
        read, write = os.pipe()
        value = shared.fileno() if shared is not None else port
        pass_fds = (write,) if shared is None else (write, shared.fileno())
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, mode, str(value), str(write)], pass_fds=pass_fds
            )
        )
        os.close(write)
        pipes.append(read)
    try:
        for read in pipes:
            assert os.read(read, 1) == b"R"
        writers = asyncio.run(_connect_and_wait(port, conns))
        del writers
        time.sleep(0.3)  # the accepts are reported
        counts = []
        for read in pipes:
            os.set_blocking(read, False)
            try:
                counts.append(len(os.read(read, 65536)))
            except BlockingIOError:
                counts.append(0)
        return counts[0], counts[1]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for read in pipes:
            os.close(read)
        if shared is not None:
            shared.close()


async def _connect_and_wait(port: int, conns: int) -> int:
    writers = await connect_all(port, conns)
    await asyncio.sleep(0.2)
    for writer in writers:
        writer.close()
    return len(writers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--conns", type=int, default=32)
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, 2 processes, {args.conns} connections at once, "
        f"{args.trials} trials\n"
    )
    print("| sharing | busier process's share: median | worst | trials where one took all |")
    print("|---|---|---|---|")
    for mode in ("reuseport", "shared"):
        shares = []
        for _ in range(args.trials):
            a, b = trial(mode, args.conns)
            shares.append(max(a, b) / max(1, a + b))
        print(
            f"| {mode} | {statistics.median(shares):.2f} | {max(shares):.2f} | "
            f"{sum(1 for s in shares if s == 1.0)} / {args.trials} |"
        )


if __name__ == "__main__":
    main()
