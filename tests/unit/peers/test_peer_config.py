"""The replica flags: --peer-port, --peer-urls, --peer-reservation-ttl-secs."""

from __future__ import annotations

import pytest

from shunter.cli import serve_config
from shunter.config import ConfigError, GatewayConfig


def test_the_flags_make_the_config() -> None:
    config = serve_config(
        [
            "--peer-port",
            "7100",
            "--peer-urls",
            "10.0.0.2:7100",
            "gw-b.local:7100",
            "--peer-reservation-ttl-secs",
            "0",
        ]
    )
    assert config.peer_port == 7100
    assert config.peer_urls == ["10.0.0.2:7100", "gw-b.local:7100"]
    assert config.peer_reservation_ttl_secs == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"peer_urls": ["a:1"]}, "--peer-urls needs --peer-port"),
        ({"peer_port": 7100, "peer_urls": ["tcp://a:1"]}, "give HOST:PORT"),
        ({"peer_port": 7100, "peer_urls": ["a"]}, "give HOST:PORT"),
        ({"peer_port": 7100, "peer_urls": ["a:70000"]}, "give HOST:PORT"),
        ({"peer_port": 7100, "peer_urls": ["ipc://"]}, "give HOST:PORT"),
        ({"peer_port": 70000}, "--peer-port"),
        ({"peer_port": 7100, "peer_reservation_ttl_secs": -1}, "--peer-reservation-ttl-secs"),
        ({"peer_secret_file": "/run/secret"}, "--peer-secret-file needs --peer-port"),
        ({"peer_port": 7100, "peer_secret_file": "/nonexistent/x"}, "No such file"),
    ],
)
def test_bad_peer_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(**settings).validate()  # type: ignore[arg-type]


def test_a_workers_child_binds_an_ipc_endpoint_and_names_its_siblings_so() -> None:
    config = GatewayConfig(peer_endpoint="ipc:///run/x/peer-0", peer_urls=["ipc:///run/x/peer-1"])
    config.validate()  # no --peer-port needed; an ipc:// peer is no HOST:PORT, and is taken
    assert config.peer_urls == ["ipc:///run/x/peer-1"]
