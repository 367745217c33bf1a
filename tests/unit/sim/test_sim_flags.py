"""`shunter sim`'s PD flags: SGLang's names and defaults, and the combinations refused."""

from __future__ import annotations

import argparse

import pytest

from shunter.cli.sim import SimFlags
from shunter.sim.config import SimConfig


def parse(*argv: str) -> SimConfig:
    parser = argparse.ArgumentParser()
    flags = SimFlags(parser)
    return flags.config(parser.parse_args(list(argv)))


def test_pd_flags_default_to_sglangs() -> None:
    config = parse()
    assert config.disaggregation_mode == "null"
    assert config.disaggregation_bootstrap_port == 8998
    assert config.disaggregation_bootstrap_timeout == 300
    config = parse(
        "--disaggregation-mode",
        "prefill",
        "--disaggregation-bootstrap-port",
        "9001",
        "--disaggregation-bootstrap-timeout",
        "0.5",
        "--runtime",
        "vllm",
    )
    assert (config.disaggregation_mode, config.runtime) == ("prefill", "vllm")
    assert (config.disaggregation_bootstrap_port, config.disaggregation_bootstrap_timeout) == (
        9001,
        0.5,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--disaggregation-mode", "decode", "--runtime", "openai"), "needs --runtime sglang"),
        (("--disaggregation-mode", "prefill", "--runtime", "vllm", "--grpc"), "HTTP only"),
        (
            (
                "--disaggregation-bootstrap-port",
                "0",
            ),
            "must be a port",
        ),
        (("--disaggregation-bootstrap-timeout", "0"), "must be > 0"),
        (("--disaggregation-mode", "both"), "invalid choice"),
    ],
)
def test_pd_flags_refuse_what_cannot_work(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err
