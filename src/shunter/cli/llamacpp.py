"""``shunter llamacpp``: llama.cpp's own server with SmolLM2, as a real-model worker."""

from __future__ import annotations

import argparse

from shunter.cli.options import ConfigFlags
from shunter.llamacpp import LlamaCppConfig


class LlamaCppFlags:
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        c = self.llama = ConfigFlags(parser, LlamaCppConfig(), "llama")
        c.flag("--host", "host")
        c.flag("--port", "port")
        c.flag("--model-path", "model_path", type=str, help="a GGUF file (default: SmolLM2-135M)")
        c.flag("--alias", "alias", help="the model id the server reports")
        c.flag("--slots", "slots", help="requests decoded at once")
        c.flag("--ctx-per-slot", "ctx_per_slot", help="context tokens per slot")
        c.flag("--threads", "threads")
        c.flag(
            "--cache-ram-mib",
            "cache_ram_mib",
            help="llama.cpp's host-RAM prompt cache; 0 (default) keeps only what the slots hold",
        )
        parser.add_argument("--log-level", default="info")

    def config(self, args: argparse.Namespace) -> LlamaCppConfig:
        config = self.llama.build(args)
        if (
            config.slots < 1
            or config.ctx_per_slot < 64
            or config.threads < 1
            or config.cache_ram_mib < 0
        ):
            self.parser.error(
                "--slots and --threads must be >= 1, --ctx-per-slot >= 64, --cache-ram-mib >= 0"
            )
        return config


def run(flags: LlamaCppFlags, args: argparse.Namespace) -> None:
    from shunter.llamacpp import LlamaCppUnavailable, run_llamacpp
    from shunter.observability.logging import setup_logging

    config = flags.config(args)
    setup_logging(args.log_level)
    try:
        run_llamacpp(config)
    except LlamaCppUnavailable as exc:
        flags.parser.exit(2, f"shunter llamacpp: {exc}\n")
