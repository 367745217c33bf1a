"""Where a whole gRPC chat's CPU goes in the gateway, under load: the call, the prompt's
tokenizing, and everything else, each found by taking it away.

Run: python bench/grpc_parts.py [--duration 5] [--rounds 3]   (needs `wrk`)

Four gateways on CPU 1 against one ``shunter sim --grpc`` on CPU 0, wrk at 16 connections
with grpc_bench.py's chat (``max_tokens`` 16), each at its default log level (the access
log on), measured one after another, ``--rounds`` times:

- ``whole``: Shunter as it is;
- ``no tokenizing``: the chat template and the prompt's encoding answered from the first
  request's (the call and all else unchanged);
- ``no call``: ``Generate`` answered in process with the sim's answer to this chat (16
  tokens), so the gateway does all its own work and makes no gRPC call;
- ``neither``: both.

``whole - no call`` is what the call costs inside the gateway, beside ``grpc_floor.py``'s
bare grpc.aio client (the same call with nothing around it, run each round); ``no call -
neither``, the prompt's tokenizing; ``neither``, the HTTP side and the answer's formatting.
The patches are applied by this file re-run as ``--serve PART`` in the gateway's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

from common import cpu_seconds, free_port, gateway_args, wait_http
from grpc_bench import CHAT, default_log_level, floor, start_sim
from proxy_bench import LUA, run_wrk, wait_routing

PARTS = {"whole": "", "no tokenizing": "tokenize", "no call": "call", "neither": "tokenize,call"}


def take_away_tokenizing() -> None:
    """The chat template and the prompt's encoding: the first answer, kept."""
    from shunter.tokenizer.tokenizer import ModelTokenizer

    def first(method: Callable[..., Any]) -> Callable[..., Any]:
        kept: list[Any] = []

        def answer(self: ModelTokenizer, *args: Any) -> Any:
            if not kept:
                kept.append(method(self, *args))
            return kept[0]

        return answer

    ModelTokenizer.apply_chat_template = first(ModelTokenizer.apply_chat_template)  # type: ignore[method-assign]
    ModelTokenizer.encode_prompt = first(ModelTokenizer.encode_prompt)  # type: ignore[method-assign]


def take_away_the_call() -> None:
    """``Generate`` answered in process: the complete message the sim sends for this chat."""
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    from shunter.backends.grpc.scheduler import SchedulerClient

    answer = pb.GenerateResponse(
        request_id="parts",
        complete=pb.GenerateComplete(
            output_ids=list(range(200, 216)),
            finish_reason="length",
            prompt_tokens=351,
            completion_tokens=16,
        ),
    )

    class Answered:
        def __aiter__(self) -> AsyncIterator[Any]:
            return self._answers()

        async def _answers(self) -> AsyncIterator[Any]:
            yield answer

        def cancel(self) -> bool:
            return True

    def generate(self: SchedulerClient, request: Any, timeout: float | None) -> Any:
        return Answered()

    SchedulerClient.generate = generate  # type: ignore[method-assign]


def serve(part: str, args: list[str]) -> None:
    """The gateway's own entry point, with ``part`` taken away first."""
    if "tokenize" in part:
        take_away_tokenizing()
    if "call" in part:
        take_away_the_call()
    from shunter.cli import main

    sys.argv = ["shunter", *args]
    main()


def start_gateway(part: str, grpc_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = default_log_level(gateway_args(port, "round_robin", f"grpc://127.0.0.1:{grpc_port}"))
    command = [sys.executable, __file__, "--serve", part, "--", *args[2:]]  # less "-m shunter"
    process = subprocess.Popen(
        ["taskset", "-c", "1", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.rest)
        return
    sim, grpc_port, http_port = start_sim()
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body_file:
        json.dump(CHAT, body_file)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body_file.name))
    cpu: dict[str, list[float]] = {name: [] for name in PARTS}
    bare: list[float] = []
    try:
        wait_http(f"http://127.0.0.1:{http_port}/health")
        gateways = {name: start_gateway(part, grpc_port) for name, part in PARTS.items()}
        for _, port in gateways.values():
            wait_routing(port, body=json.dumps(CHAT).encode())
        for _ in range(args.rounds):
            for name, (process, port) in gateways.items():
                before = cpu_seconds(process.pid)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                result = run_wrk(url, 16, args.duration, script.name)
                cpu[name].append((cpu_seconds(process.pid) - before) / result["total"] * 1e6)
            bare.append(floor(grpc_port)[0][1])  # grpc.aio, CPU per call
    finally:
        for process, _ in gateways.values():
            process.terminate()
            process.wait()
        sim.terminate()
        sim.wait()
        os.unlink(script.name)
        os.unlink(body_file.name)
    median = {name: statistics.median(figures) for name, figures in cpu.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"gateway CPU per whole gRPC chat, medians of {args.rounds}; load average {load}")
    for name, figures in cpu.items():
        runs = " / ".join(f"{x:.0f}" for x in figures)
        print(f"{name:>14} | {median[name]:6.0f} us | {runs}")
    print(
        f"the call {median['whole'] - median['no call']:.0f} us, tokenizing "
        f"{median['no call'] - median['neither']:.0f} us, the rest {median['neither']:.0f} us; "
        f"a bare grpc.aio call (grpc_floor.py) {statistics.median(bare):.0f} us"
    )


if __name__ == "__main__":
    main()
