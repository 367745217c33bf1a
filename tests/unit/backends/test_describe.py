"""What an HTTP worker says about itself: the KV-events endpoint SGLang advertises."""

from __future__ import annotations

from typing import Any

import pytest

from shunter.backends.http.discovery import _kv_events_endpoint


@pytest.mark.parametrize(
    ("advertised", "base_url", "expected"),
    [
        (
            {"endpoint_host": "10.0.0.8", "endpoint_port_base": 5557},
            "http://w:30000",
            "tcp://10.0.0.8:5557",
        ),
        (
            {"endpoint_host": "*", "endpoint_port_base": 5557},
            "http://10.0.0.9:30000",
            "tcp://10.0.0.9:5557",
        ),
        ({"endpoint_host": "0.0.0.0", "endpoint_port_base": 5557}, "http://w:1", "tcp://w:5557"),
        ({"endpoint_port_base": 5557}, "http://[::1]:30000", "tcp://[::1]:5557"),
        ({"endpoint_host": "w", "endpoint_port_base": 0}, "http://w:1", None),
        ({"endpoint_host": "w", "endpoint_port_base": 70000}, "http://w:1", None),
        ({"endpoint_host": "w", "endpoint_port_base": "5557"}, "http://w:1", None),
        ({"endpoint_host": "w", "endpoint_port_base": True}, "http://w:1", None),
        ({"endpoint_host": "a/b", "endpoint_port_base": 5557}, "http://w:1", None),
        (None, "http://w:1", None),
        ("tcp://w:5557", "http://w:1", None),
    ],
)
def test_the_advertised_endpoint(advertised: Any, base_url: str, expected: str | None) -> None:
    assert _kv_events_endpoint(advertised, base_url) == expected
