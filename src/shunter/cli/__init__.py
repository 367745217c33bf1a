"""``shunter serve | sim | demo | llamacpp``: one module per subcommand.

The gateway (``serve``, alias ``launch``) takes sglang-router's flags and defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shunter import __version__
from shunter.cli import demo, llamacpp, serve, sim
from shunter.config import GatewayConfig


def _run_serve(flags: serve.ServeFlags, args: argparse.Namespace) -> None:
    config = flags.config(args)
    if config.workers > 1 and not config.supervised:
        from shunter.supervise import run_supervisor

        # The children run this same command line, each with its slot's hidden flags.
        run_supervisor(config, args.argv)
        return
    from shunter.run import run_gateway

    run_gateway(config)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[Any, Callable[..., None]]]]:
    """The parser, and per subcommand its flags object and what runs it."""
    parser = argparse.ArgumentParser(prog="shunter", description=__doc__)
    parser.add_argument("--version", "-V", action="version", version=f"shunter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = serve.ServeFlags(
        commands.add_parser("serve", aliases=["launch"], help="run the gateway")
    )
    simulating = sim.SimFlags(commands.add_parser("sim", help="run a simulated inference worker"))
    demoing = demo.DemoFlags(
        commands.add_parser("demo", help="run the gateway in front of two simulated workers")
    )
    llama = llamacpp.LlamaCppFlags(
        commands.add_parser(
            "llamacpp", help="run llama.cpp's server with SmolLM2 (needs the e2e extra)"
        )
    )
    return parser, {
        "serve": (serving, _run_serve),
        "launch": (serving, _run_serve),
        "sim": (simulating, sim.run),
        "demo": (demoing, demo.run),
        "llamacpp": (llama, llamacpp.run),
    }


def serve_config(argv: Sequence[str]) -> GatewayConfig:
    """The config ``shunter serve <argv>`` would run with (exits on a bad flag, as it would)."""
    parser, commands = build_parser()
    args = parser.parse_args(["serve", *argv])
    flags, _run = commands["serve"]
    config: GatewayConfig = flags.config(args)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    flags, run = commands[args.command]
    run(flags, args)
