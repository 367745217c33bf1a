"""Where a held stream's bytes go in the gateway: tracemalloc, per source line.

Run: python bench/stream_memory.py [--first 500] [--then 2500] [--lines 40]

A gateway (tracing its allocations) in front of one slow sim (a token a second); FIRST slow
streams are opened and held, then THEN in all. The gateway snapshots its allocations at
both points (on SIGUSR1), and the difference divided by the streams opened in between is
what one more held stream costs, by the line that allocated it, free of start-up and
warm-up allocations. ``chaos_bench.py streams`` gives the RSS at 10,000 streams; this says
where it goes (its per-stream total was ~90% of that figure's per-stream RSS on 2026-12-01).
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from chaos_bench import hold_stream, raise_fd_limit
from common import free_port, start, wait_http

# The gateway, with tracemalloc on and a snapshot written to the directory in argv[1] on
# each SIGUSR1 (snapshot N: N.trace, then N.done once it is whole).
GATEWAY = """
import signal, sys, tracemalloc
from pathlib import Path
out = Path(sys.argv[1])
taken = 0
def snapshot(*_):
    global taken
    taken += 1
    tracemalloc.take_snapshot().dump(str(out / f"{taken}.trace"))
    (out / f"{taken}.done").touch()
tracemalloc.start()
signal.signal(signal.SIGUSR1, snapshot)
from shunter.cli import main
main(["serve", *sys.argv[2:]])
"""


def snapshot(pid: int, out: Path, n: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not (out / f"{n}.done").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway wrote no snapshot")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(out / f"{n}.trace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first", type=int, default=500, help="streams held at the 1st snapshot")
    parser.add_argument("--then", type=int, default=2500, help="streams held at the 2nd")
    parser.add_argument("--lines", type=int, default=40, help="source lines shown")
    args = parser.parse_args()
    raise_fd_limit()  # 3 descriptors a stream here
    sim_port, port = free_port(), free_port()
    sim = start(
        [
            *(sys.executable, "-m", "shunter", "sim", "--port", str(sim_port)),
            *("--itl-ms", "1000", "--max-running", str(args.then * 2)),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        gateway = subprocess.Popen(
            [
                *(sys.executable, "-c", GATEWAY, tmp, "--host", "127.0.0.1", "--port", str(port)),
                *("--prometheus-port", "0", "--log-level", "error", "--policy", "round_robin"),
                *("--worker-urls", f"http://127.0.0.1:{sim_port}"),
            ]
        )
        try:
            wait_http(f"http://127.0.0.1:{sim_port}/health")
            wait_http(f"http://127.0.0.1:{port}/readiness")
            snapshots = asyncio.run(_hold(port, args.first, args.then, gateway.pid, out))
        finally:
            gateway.kill()
            gateway.wait()
            sim.kill()
            sim.wait()
    _report(*snapshots, args.then - args.first, args.lines)


async def _hold(
    port: int, first: int, then: int, pid: int, out: Path
) -> tuple[tracemalloc.Snapshot, tracemalloc.Snapshot]:
    """Hold ``first`` streams, snapshot, hold ``then`` in all, snapshot (``chaos_bench``'s
    streams); a few streams opened and closed beforehand make the one-off objects of a
    first stream."""
    done = asyncio.Event()
    opened: list[int] = []
    warm = asyncio.Event()
    warming = [asyncio.ensure_future(hold_stream(port, [], warm)) for _ in range(20)]
    await asyncio.sleep(2)
    warm.set()
    await asyncio.gather(*warming)
    streams: list[asyncio.Future[bool]] = []
    taken = []
    for n, target in enumerate((first, then), 1):
        while len(streams) < target:  # at most 200 opening at once
            batch = min(200, target - len(streams))
            for _ in range(batch):
                streams.append(asyncio.ensure_future(hold_stream(port, opened, done)))
            while len(opened) < len(streams):
                if any(stream.done() for stream in streams):  # it ended before ``done``
                    raise RuntimeError("a stream was not held: the gateway closed it")
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # each has had a chunk or two since its first
        taken.append(await asyncio.to_thread(snapshot, pid, out, n))
    done.set()
    await asyncio.gather(*streams)
    return taken[0], taken[1]


def _report(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, streams: int, lines: int
) -> None:
    ignored = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignored).compare_to(before.filter_traces(ignored), "lineno")
    total = sum(stat.size_diff for stat in stats)
    print(f"tracemalloc: {total / streams:,.0f} bytes per held stream ({streams:,} streams)")
    for stat in stats[:lines]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        code = linecache.getline(frame.filename, frame.lineno).strip()[:70]
        print(
            f"{stat.size_diff / streams:7,.0f} B {stat.count_diff / streams:5.2f} blocks  "
            f"{where:<16} {code}"
        )


if __name__ == "__main__":
    main()
