"""`shunter demo`: two sims and the gateway; the snippets it prints work as printed."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx

from support.harness import Proc, free_port, wait_for


def test_demo_serves_and_its_printed_snippets_work(procs: list[Proc]) -> None:
    port, metrics = free_port(), free_port()
    demo = Proc(["demo", "--port", str(port), "--prometheus-port", str(metrics)])
    procs.append(demo)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return bool(httpx.get(url + "/readiness", timeout=1).json().get("healthy_workers") == 2)

    wait_for(ready, 20, "the demo fleet")
    banner = demo.output()
    snippet = re.search(r"python - <<'PY'\n(.*?)\nPY\n", banner, re.S)
    assert snippet is not None, banner
    streamed = subprocess.run(
        [sys.executable, "-c", snippet.group(1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(streamed.stdout.split()) == 16  # the sims' default answer length
    sims = re.findall(r"http://127\.0\.0\.1:(\d+)", banner.split("Try:")[0])
    sim_urls = [f"http://127.0.0.1:{p}" for p in sims if int(p) not in (port, metrics)]
    assert len(sim_urls) == 2
    demo.stop()
    assert demo.popen.returncode == 0
    for sim_url in sim_urls:  # the demo stopped its sims too
        try:
            httpx.get(sim_url + "/health", timeout=1)
            raise AssertionError(f"{sim_url} still answers")
        except httpx.TransportError:
            pass
