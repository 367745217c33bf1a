"""Micro-benchmarks of the upstream client, each beside a baseline revision in the same run.

    python bench/client_bench.py chunks [--baseline REV]  # h1stream: CPU per chunk, request
    python bench/client_bench.py whole  [--baseline REV]  # reqwest: per whole response
    python bench/client_bench.py rss    [--baseline REV]  # reqwest: one 200 MiB response

The baseline is the same module as it was at REV (``git show``, default HEAD), loaded beside
the working copy's, so both run on the same machine, in the same minutes, rounds
interleaved. ``chunks`` first drives the streaming client in process (bytes handed to its
protocol directly: no socket, no worker, the steadiest figure), then against a worker. The
worker is a raw asyncio server (uvloop, like the gateway) in a process of its own, so CPU
figures are the client's alone (``time.process_time`` of this process, every thread).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

from common import free_port

ROOT = Path(__file__).resolve().parent.parent
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" token"},'
    b'"finish_reason":null}]}\n\n'
)
ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox '
    b'jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,'
    b'"completion_tokens":10,"total_tokens":260}}'
)
HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"bench-0123456789")]


# --- the worker ---------------------------------------------------------------------------


_BIG: dict[int, bytes] = {}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            sized = head.lower().split(b"content-length: ")
            await reader.readexactly(int(sized[1].split(b"\r\n")[0]) if len(sized) > 1 else 0)
            target = head.split(b" ", 2)[1]
            if target.startswith(b"/stream"):
                count, paced = (int(x) for x in target.split(b"/")[2:4])
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                framed = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
                for _ in range(count):
                    writer.write(framed)
                    if paced:
                        await writer.drain()
                        await asyncio.sleep(0.0001)
                writer.write(b"0\r\n\r\n")
            elif target.startswith(b"/big"):
                size = int(target.split(b"/")[2]) << 20
                if size not in _BIG:
                    _BIG[size] = b"x" * size
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                writer.write(_BIG[size])
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class Worker:
    def __enter__(self) -> str:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "serve", str(self.port)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait()


# --- the modules under test ------------------------------------------------------------------


def load(rev: str | None, name: str) -> ModuleType:
    """``shunter.wire.<name>`` from the working copy, or as it was at ``rev`` (a revision
    with the ``wire/`` layout: the modules were ``transport/h1stream.py`` and
    ``transport/reqwest.py`` before it, with string headers)."""
    if rev is None:
        return importlib.import_module(f"shunter.wire.{name}")
    source = subprocess.check_output(["git", "show", f"{rev}:src/shunter/wire/{name}.py"], cwd=ROOT)
    path = Path(tempfile.mkdtemp()) / f"baseline_{name}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def variants(rev: str, name: str) -> dict[str, ModuleType]:
    return {f"baseline {rev}": load(rev, name), "working copy": load(None, name)}


# --- the benchmarks ------------------------------------------------------------------------


async def _chunks(module: ModuleType, base: str, streams: int, count: int, paced: int) -> float:
    """CPU seconds per chunk read from ``streams`` streams of ``count`` chunks."""
    client = module.H1StreamClient(base, 10.0, 10.0)
    url = f"{base}/stream/{count}/{paced}"
    started = time.process_time()
    for _ in range(streams):
        stream = await client.stream("POST", url, HEADERS, b'{"stream": true}')
        while await stream.next_chunk() is not None:
            pass
        await stream.aclose()
    spent = time.process_time() - started
    await client.close()
    return spent / (streams * count)


async def _whole(
    module: ModuleType, base: str, requests: int, concurrency: int
) -> tuple[float, float]:
    """Wall and CPU seconds per whole response, ``concurrency`` requests at a time."""
    client = module.ReqwestClient(module.ClientSettings())
    url = base + "/whole"

    async def one_by_one(n: int) -> None:
        for _ in range(n):
            response = await client.request("POST", url, HEADERS, b"{}")
            assert response.status == 200 and len(response.body) == len(ANSWER)

    await one_by_one(50)  # warm the pool
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_by_one(requests // concurrency) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.close()
    return wall / requests, cpu / requests


def _report(title: str, unit: str, results: dict[str, list[float]], scale: float) -> None:
    """Median and minimum of the rounds; on a shared machine the minimum is the steadier
    figure for CPU-bound code, the median for anything that waits on the network."""
    print(title)
    first = results[next(iter(results))]
    for name, values in results.items():
        median, least = statistics.median(values), min(values)
        print(
            f"  {name:>22}: median {median * scale:8.2f} {unit} "
            f"({median / statistics.median(first):.3f}x), min {least * scale:8.2f} {unit} "
            f"({least / min(first):.3f}x)"
        )


class _Transport(asyncio.Transport):
    """Enough of a socket transport for ``_feed``: writes vanish, reading never pauses."""

    def write(self, data: Any) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _feed(module: ModuleType, count: int, reader_waits: bool) -> float:
    """CPU seconds per chunk through the client's own code alone: one chunk per read, as a
    paced inference stream arrives, with no socket and no worker in the measurement."""
    loop = asyncio.get_running_loop()
    client = module.H1StreamClient("http://127.0.0.1:9", 10.0, 10.0)
    try:
        conn = module._Connection(client, loop)
    except TypeError:  # before the connection knew its client
        conn = module._Connection(loop)
    conn.connection_made(_Transport())
    sending = asyncio.ensure_future(client._send(conn, b"POST / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    stream = await sending
    framed = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
    started = time.process_time()
    if reader_waits:  # the relay is already waiting when the chunk arrives
        for _ in range(count):
            waiting = asyncio.ensure_future(stream.next_chunk())
            await asyncio.sleep(0)
            conn.data_received(framed)
            await waiting
    else:  # the chunk is there before the relay asks
        for _ in range(count):
            conn.data_received(framed)
            await stream.next_chunk()
    return (time.process_time() - started) / count


class _AnsweringTransport(_Transport):
    """Answers every request at once with a small response, as a worker on the loop would."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    def write(self, data: Any) -> None:
        asyncio.get_running_loop().call_soon(self.protocol.data_received, self.answer)


async def _requests(module: ModuleType, count: int) -> float:
    """CPU seconds per request through the client's own code (build and check the request,
    take a pooled connection, parse the head, read the body, give the connection back)."""
    loop = asyncio.get_running_loop()
    client = module.H1StreamClient("http://127.0.0.1:9", 10.0, 10.0)
    try:
        conn = module._Connection(client, loop)
    except TypeError:
        conn = module._Connection(loop)
    conn.connection_made(_AnsweringTransport(conn))
    client.release(conn)
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-0123456789abcdef0123456789abcdef"),
        (b"user-agent", b"OpenAI/Python 1.54.0"),
        (b"accept", b"application/json"),
        (b"x-request-id", b"9f0e4c1a-6b1f-4a51-9d1c-7d7c3a5b2e11"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"x-stainless-lang", b"python"),
        (b"accept-encoding", b"identity"),
    ]
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    started = time.process_time()
    for _ in range(count):
        stream = await client.stream(
            "POST", "http://127.0.0.1:9/v1/chat/completions", headers, body
        )
        while await stream.next_chunk() is not None:
            pass
        await stream.aclose()
    return (time.process_time() - started) / count


def bench_chunks(rev: str, rounds: int) -> None:
    modules = variants(rev, "client")
    for reader_waits, label in ((False, "chunk read before asked"), (True, "relay waits for it")):
        results: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(rounds):
            for name, module in modules.items():
                results[name].append(uvloop.run(_feed(module, 100_000, reader_waits)))
        _report(f"client CPU per streamed chunk, in process, {label}", "µs", results, 1e6)
    results = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            results[name].append(uvloop.run(_requests(module, 20_000)))
    _report(
        "client CPU per streamed request (8 headers, 2-byte body), in process", "µs", results, 1e6
    )
    with Worker() as base:
        results = {name: [] for name in modules}
        for _ in range(rounds):
            for name, module in modules.items():
                results[name].append(uvloop.run(_chunks(module, base, 5, 2000, 1)))
        _report("process CPU per streamed chunk, from a worker process, paced", "µs", results, 1e6)


def bench_whole(rev: str, rounds: int) -> None:
    modules = variants(rev, "reqwest")
    with Worker() as base:
        for concurrency in (1, 16):
            wall: dict[str, list[float]] = {name: [] for name in modules}
            cpu: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(rounds):
                for name, module in modules.items():
                    w, c = uvloop.run(_whole(module, base, 3200, concurrency))
                    wall[name].append(w)
                    cpu[name].append(c)
            _report(
                f"whole ~300-byte response, {concurrency} at a time: wall per request",
                "µs",
                wall,
                1e6,
            )
            _report(
                f"whole ~300-byte response, {concurrency} at a time: CPU per request",
                "µs",
                cpu,
                1e6,
            )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _rss_one(module: ModuleType, url: str) -> tuple[float, float, int]:
    settings = module.ClientSettings()
    if "max_response_bytes" in module.ClientSettings.__dataclass_fields__:
        settings = module.ClientSettings(max_response_bytes=1 << 30)
    client = module.ReqwestClient(settings)
    await client.request("GET", url.rsplit("/", 2)[0] + "/whole", [], None)  # load everything
    before = _peak_mib()
    started = time.perf_counter()
    response = await client.request("GET", url, [], None)
    took = time.perf_counter() - started
    size = len(response.body)
    del response
    await client.close()
    return _peak_mib() - before, took, size


def bench_rss(rev: str, rounds: int, mib: int) -> None:
    with Worker() as base:
        results: dict[str, list[float]] = {f"baseline {rev}": [], "working copy": []}
        times: dict[str, list[float]] = {name: [] for name in results}
        for _ in range(rounds):
            for name, which in zip(results, (rev, "-"), strict=True):
                out = subprocess.check_output(
                    [sys.executable, __file__, "rss-one", which, f"{base}/big/{mib}"]
                )
                peak, took, size = out.split()
                assert int(size) == mib << 20
                results[name].append(float(peak))
                times[name].append(float(took))
        _report(f"peak RSS growth for one {mib} MiB whole response", "MiB", results, 1)
        _report(f"time for one {mib} MiB whole response", "ms", times, 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("chunks", "whole", "rss", "serve", "rss-one"))
    parser.add_argument("args", nargs="*")
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    if args.what == "serve":
        uvloop.run(_serve(int(args.args[0])))
    elif args.what == "rss-one":
        rev, url = args.args
        module = load(None if rev == "-" else rev, "reqwest")
        peak, took, size = uvloop.run(_rss_one(module, url))
        print(f"{peak:.1f} {took:.4f} {size}")
    elif args.what == "chunks":
        bench_chunks(args.baseline, args.rounds)
    elif args.what == "whole":
        bench_whole(args.baseline, args.rounds)
    else:
        bench_rss(args.baseline, args.rounds, args.mib)


if __name__ == "__main__":
    main()
