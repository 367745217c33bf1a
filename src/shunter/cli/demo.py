"""``shunter demo``: the gateway in front of two simulated workers, ready to try."""

from __future__ import annotations

import argparse

from shunter.config import GatewayConfig


class DemoFlags:
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        defaults = GatewayConfig()
        parser.add_argument("--port", type=int, default=defaults.port)
        parser.add_argument("--prometheus-port", type=int, default=defaults.prometheus_port)


def run(flags: DemoFlags, args: argparse.Namespace) -> None:
    from shunter.demo import run_demo

    run_demo(args.port, args.prometheus_port)
