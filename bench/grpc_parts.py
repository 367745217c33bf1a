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
import os
import statistics
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

from common import free_port, gateway_args
from grpc_bench import chat_bench, default_log_level, floor
from proxy_bench import spawn

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
            prompt_tokens=351,  # CHAT's prompt as the sim's tokenizer counts it (usage only)
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

    main(args)


def start_gateway(part: str, grpc_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = default_log_level(gateway_args(port, "round_robin", f"grpc://127.0.0.1:{grpc_port}"))
    return spawn(1, __file__, "--serve", part, "--", *args[2:]), port  # less "-m shunter"


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
    cpu: dict[str, list[float]] = {name: [] for name in PARTS}
    bare: list[float] = []
    with chat_bench() as bench:
        for name, part in PARTS.items():
            bench.gateways[name] = start_gateway(part, bench.grpc_port)
        bench.wait_routing()
        for _ in range(args.rounds):
            for name in PARTS:
                cpu[name].append(bench.chat_cpu(name, args.duration)[0])
            bare.append(floor(bench.grpc_port, "grpc.aio")[0][1])  # CPU per call
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
