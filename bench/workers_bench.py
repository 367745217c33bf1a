"""``--workers N``: requests per second and gateway CPU per request for N = 1 and N = 2,
and how evenly SO_REUSEPORT spreads connections and requests over the processes.

Run: python bench/workers_bench.py [--duration 8] [--rounds 2] [--conns 32]
                                   [--upstream sim|nginx] [--sims 2]
(needs `wrk`; ``--upstream nginx`` needs nginx, ``apt-get install nginx-light``)

Everything shares the machine (no CPU pinning: N = 2 is there to use both cores), with
``shunter sim`` workers answering at once (``--ttft-ms 0 --itl-ms 0``), so req/s is what
the whole machine makes of it, and on a 2-core machine the sims and wrk take their share
of the cores the gateway would use. ``--upstream nginx`` puts one nginx process in their
place, answering mock_upstream.py's fixed chat completion at a fraction of the gateway's
CPU per request: the gateway is then what limits req/s, and what N = 2 adds shows.

Gateway CPU per request is the user+system time of the supervisor and all its children
over the requests wrk completed; upstream CPU per request, the same for the sims or nginx;
machine busy, the share of all the cores' time not idle (/proc/stat, the whole machine's:
a VM's host or a container's neighbours are not in it, steal time counts as busy): near
100%, the machine has nothing more to give. The spread: the connections each process holds
halfway through the run (its sockets on the gateway's port, from /proc), and the requests
each process counted (read from its own metrics socket). N = 1 and N = 2 alternate,
``--rounds`` times each; each row is one run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import WRK_POST_LUA, cpu_seconds, free_port, start, start_sims, wait_http
from mock_upstream import ANSWER, MODELS, SERVER_INFO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from shunter.observability.merged import fetch_exposition  # noqa: E402

BODY = HERE / "chat_1k.json"
LUA = WRK_POST_LUA


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location = /health {{ return 200; }}
        location = /server_info {{ return 200 '{server_info}'; }}
        location = /v1/models {{ return 200 '{models}'; }}
        location / {{ return 200 '{answer}'; }}
    }}
}}
"""


def start_nginx(where: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """One nginx process (no master) answering every POST with a fixed chat completion;
    its configuration, logs and temporary files in ``where`` (so it runs as any user)."""
    bodies = {"server_info": SERVER_INFO, "models": MODELS, "answer": ANSWER}
    texts = {name: body.decode() for name, body in bodies.items()}
    for name, text in texts.items():  # each goes in a single-quoted nginx string
        assert not set(text) & {"'", "$", "\\"}, f"{name} needs nginx escaping"
    port = free_port()
    conf = where / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=where, port=port, **texts))
    process = start(["nginx", "-p", str(where), "-c", str(conf)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
    except BaseException:
        process.terminate()
        process.wait(10)
        raise
    return [process], [url]


def machine_times() -> tuple[int, int]:
    """The machine's (busy, total) CPU ticks since boot, from /proc/stat's first line: user,
    nice, system, idle, iowait, irq, softirq, steal (guest time, after those, is already
    counted in user and nice)."""
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    fields = [int(field) for field in line.split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def metrics_socket(pid: int) -> str | None:
    """The child's control socket (supervisor/control.py), which answers its metrics."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"--control-socket" in args:
        return args[args.index(b"--control-socket") + 1].decode()
    return None


def connections(pid: int, port: int, state: str = "01") -> int:
    """TCP sockets of ``pid`` on local port ``port`` in ``state`` (01: established, its
    clients; 0A: listening)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


def requests_counted(socket_path: str) -> float:
    text = fetch_exposition(socket_path)
    match = re.search(
        r'^smg_http_requests_total\{method="POST",path="/v1/chat/completions",'
        r'status="2xx"\} (\S+)',
        text,
        re.M,
    )
    return float(match.group(1)) if match else 0.0


def run_wrk(url: str, conns: int, seconds: int, script: str) -> tuple[int, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed responses")
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return total, rps


def gateway(workers: int, upstreams: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "shunter",
        "serve",
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warning",
        "--shutdown-grace-period-secs",
        "0.5",
        "--policy",
        "round_robin",
        "--worker-urls",
        *upstreams,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


def wait_serving(port: int, workers: int, pid: int, upstreams: int) -> None:
    """Until every process routes (each registers the upstreams on its own)."""
    wait_http(f"http://127.0.0.1:{port}/health")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = children(pid) if workers > 1 else [pid]
        if (
            len(pids) == workers
            and all(_registered(p, upstreams) and connections(p, port, "0A") for p in pids)
            and _routes(port)
        ):
            return
        time.sleep(0.2)
    raise TimeoutError("gateway not routing")


def _registered(pid: int, upstreams: int) -> bool:
    """Whether process ``pid`` has every sim registered (N = 1: not read, routing shows it)."""
    path = metrics_socket(pid)
    if path is None:
        return True
    try:
        text = fetch_exposition(path)
    except OSError:
        return False
    return (
        sum(float(v) for v in re.findall(r"^smg_worker_pool_size\{.*\} (\S+)", text, re.M))
        == upstreams
    )


def _routes(port: int) -> bool:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=BODY.read_bytes(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def measure(
    workers: int,
    upstreams: list[str],
    upstream_pids: list[int],
    args: argparse.Namespace,
    script: str,
) -> dict[str, Any]:
    process, port = gateway(workers, upstreams)
    try:
        wait_serving(port, workers, process.pid, len(upstreams))
        pids = [process.pid, *children(process.pid)]
        serving = pids[1:] if workers > 1 else pids
        sockets = [metrics_socket(pid) for pid in serving]
        counted_before = [requests_counted(s) if s else 0.0 for s in sockets]
        before = sum(cpu_seconds(pid) for pid in pids)
        upstreams_before = sum(cpu_seconds(pid) for pid in upstream_pids)
        busy_before, total_before = machine_times()
        held: list[int] = []
        timer = threading.Timer(
            args.duration / 2, lambda: held.extend(connections(p, port) for p in serving)
        )
        timer.start()
        total, rps = run_wrk(
            f"http://127.0.0.1:{port}/v1/chat/completions", args.conns, args.duration, script
        )
        cpu = sum(cpu_seconds(pid) for pid in pids) - before
        upstreams_cpu = sum(cpu_seconds(pid) for pid in upstream_pids) - upstreams_before
        busy_after, total_after = machine_times()
        busy, ticks = busy_after - busy_before, total_after - total_before
        counted = [
            (requests_counted(s) if s else 0.0) - b
            for s, b in zip(sockets, counted_before, strict=True)
        ]
        return {
            "workers": workers,
            "rps": rps,
            "cpu_us": cpu / total * 1e6,
            "upstream_cpu_us": upstreams_cpu / total * 1e6,
            "machine_busy": busy / max(1, ticks),
            "connections": held,
            "requests": [int(c) for c in counted] if workers > 1 else [total],
        }
    finally:
        process.terminate()
        process.wait(30)


def measure_both(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """N = 1 and N = 2 in turn, ``args.rounds`` times, against the upstream ``args`` asks for
    (started here, stopped at the end; its files in ``scratch``)."""
    if args.upstream == "nginx":
        upstreams, urls = start_nginx(scratch)
    else:
        upstreams, urls = start_sims(args.sims, "--ttft-ms", "0", "--itl-ms", "0")
    script = scratch / "post.lua"
    script.write_text(LUA.format(body=BODY))
    pids = [upstream.pid for upstream in upstreams]
    rows = []
    try:
        for _ in range(args.rounds):
            for workers in (1, 2):
                rows.append(measure(workers, urls, pids, args, str(script)))
                print(rows[-1], flush=True)
    finally:
        for upstream in upstreams:
            upstream.terminate()
        for upstream in upstreams:
            upstream.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--sims", type=int, default=2)
    parser.add_argument("--upstream", choices=("sim", "nginx"), default="sim")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shunter-workers-") as scratch:
        rows = measure_both(args, Path(scratch))
    upstreams = f"{args.sims} sims" if args.upstream == "sim" else "1 nginx"
    print(
        f"\n{os.cpu_count()} CPUs, {upstreams}, {args.conns} connections, "
        f"{args.duration} s per run\n"
    )
    print(
        "| --workers | req/s | gateway CPU per request | upstream CPU per request | machine busy "
        "| connections per process "
        "| requests per process |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['rps']:.0f} | {row['cpu_us']:.0f} µs | "
            f"{row['upstream_cpu_us']:.0f} µs | {row['machine_busy']:.0%} | "
            f"{' / '.join(map(str, row['connections']))} | "
            f"{' / '.join(map(str, row['requests']))} |"
        )
    for workers in (1, 2):
        mine = [r for r in rows if r["workers"] == workers]
        print(
            f"median N={workers}: {statistics.median(r['rps'] for r in mine):.0f} req/s, "
            f"{statistics.median(r['cpu_us'] for r in mine):.0f} µs/request"
        )


if __name__ == "__main__":
    main()
