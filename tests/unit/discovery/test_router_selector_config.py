"""``--router-selector``: its flag, and what it needs and allows."""

from __future__ import annotations

import pytest

from shunter.cli import serve_config
from shunter.config import ConfigError, GatewayConfig
from shunter.discovery.config import DiscoveryConfig


def test_the_flag_makes_the_selector_and_takes_the_api_settings_without_discovery() -> None:
    config = serve_config(
        [
            "--peer-port",
            "7100",
            "--router-selector",
            "app.kubernetes.io/name=shunter",
            "tier=gw",
            "--kubeconfig",
            "/k",
            "--service-discovery-namespace",
            "prod",
        ]
    )
    assert config.discovery.router_selector == {"app.kubernetes.io/name": "shunter", "tier": "gw"}
    assert not config.discovery.enabled
    assert config.discovery.kubeconfig == "/k"


@pytest.mark.parametrize(
    ("discovery", "peer_port", "message"),
    [
        (
            DiscoveryConfig(router_selector={"app": "gw"}),
            None,
            "--router-selector needs --peer-port",
        ),
        (DiscoveryConfig(kubeconfig="/k"), 7100, "--kubeconfig: service discovery settings need"),
        (
            DiscoveryConfig(router_selector={"app": "gw"}, selector={"app": "w"}),
            7100,
            "--selector: service discovery settings need",
        ),
        (
            DiscoveryConfig(router_selector={"app": "gw"}, namespace="Bad_NS"),
            7100,
            "is not a namespace name",
        ),
    ],
)
def test_bad_router_selector_settings_are_refused(
    discovery: DiscoveryConfig, peer_port: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(peer_port=peer_port, discovery=discovery).validate()


def test_a_malformed_selector_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        serve_config(["--peer-port", "7100", "--router-selector", "no-equals-sign"])
    assert "--router-selector 'no-equals-sign'" in capsys.readouterr().err
