"""`shunter demo`: two simulated workers and the gateway in front of them."""

from __future__ import annotations

import socket
import subprocess
import sys

from shunter.config import GatewayConfig
from shunter.run import run_gateway


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(port: int, prometheus_port: int) -> None:
    sims = []
    urls = []
    for name in ("sim-a", "sim-b"):
        sim_port = free_port()
        sims.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shunter",
                    "sim",
                    "--port",
                    str(sim_port),
                    "--worker-id",
                    name,
                    "--itl-ms",
                    "30",
                ]
            )
        )
        urls.append(f"http://127.0.0.1:{sim_port}")
    base = f"http://127.0.0.1:{port}"
    banner = f"""
Shunter demo: gateway on {base} in front of {" and ".join(urls)}
(metrics on http://127.0.0.1:{prometheus_port}/metrics). Try:

curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\
  -d '{{"model": "sim-model", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
messages = [{{"role": "user", "content": "Hello!"}}]
for chunk in client.chat.completions.create(model="sim-model", messages=messages, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

Workers: curl -s {base}/workers        Stop: Ctrl-C
"""
    sys.stderr.write(banner + "\n")
    try:
        run_gateway(
            GatewayConfig(
                host="127.0.0.1",
                port=port,
                worker_urls=urls,
                prometheus_host="127.0.0.1",
                prometheus_port=prometheus_port,
            )
        )
    finally:
        for sim in sims:
            sim.terminate()
        for sim in sims:
            sim.wait(timeout=10)
