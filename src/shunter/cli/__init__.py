"""``shunter serve | sim | demo | llamacpp``: one module per subcommand.

The gateway (``serve``, alias ``launch``) takes sglang-router's flags and defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shunter import __version__
from shunter.compiled import installed_build

if TYPE_CHECKING:
    from shunter.config import GatewayConfig


@dataclass(frozen=True)
class Command:
    """A subcommand: its module under ``shunter.cli`` (its flags class, named here, and
    its ``run(flags, args)``), and its help line."""

    module: str
    flags: str
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS = {
    "serve": Command("serve", "ServeFlags", "run the gateway", ("launch",)),
    "sim": Command("sim", "SimFlags", "run a simulated inference worker"),
    "demo": Command("demo", "DemoFlags", "run the gateway in front of two simulated workers"),
    "llamacpp": Command(
        "llamacpp", "LlamaCppFlags", "run llama.cpp's server with SmolLM2 (needs the e2e extra)"
    ),
}
_NAMES = {alias: name for name, c in COMMANDS.items() for alias in (name, *c.aliases)}


def build_parser(
    only: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, tuple[Any, Callable[..., None]]]]:
    """The parser, and per subcommand its flags object and what runs it.

    ``only``: the subcommand about to run; the others are listed (for ``--help``) but
    their modules are not imported. A simulated worker then starts without importing the
    gateway (~0.15 s of CPU, and the test suite starts hundreds of them).
    """
    parser = argparse.ArgumentParser(prog="shunter", description=__doc__)
    parser.add_argument(
        "--version", "-V", action="version", version=f"shunter {__version__} ({installed_build()})"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Any, Callable[..., None]]] = {}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, aliases=list(command.aliases), help=command.help)
        if only is not None and _NAMES.get(only) != name:
            continue
        module = importlib.import_module(f"shunter.cli.{command.module}")
        flags = getattr(module, command.flags)(sub)
        run = module.run
        for alias in (name, *command.aliases):
            commands[alias] = (flags, run)
    return parser, commands


def serve_config(argv: Sequence[str]) -> GatewayConfig:
    """The config ``shunter serve <argv>`` would run with (exits on a bad flag, as it would)."""
    parser, commands = build_parser("serve")
    args = parser.parse_args(["serve", *argv])
    flags, _run = commands["serve"]
    config: GatewayConfig = flags.config(args)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    chosen = given[0] if given and given[0] in _NAMES else None
    parser, commands = build_parser(chosen)
    args = parser.parse_args(given)
    args.argv = given
    flags, run = commands[args.command]
    run(flags, args)
