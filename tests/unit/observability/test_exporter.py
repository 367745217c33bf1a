"""The /metrics listener serves a registry and stops without waiting for a poll."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from shunter.observability.exporter import Exporter


def registry_with_a_counter() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("shunter_test_events", "Events counted by the test.", registry=registry).inc(3)
    return registry


def test_it_serves_the_registry_and_close_releases_the_port_at_once() -> None:
    exporter = Exporter("127.0.0.1", 0, registry_with_a_counter())
    for _ in range(3):  # one thread per scrape; the listener goes on accepting
        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
        assert "shunter_test_events_total 3.0" in text
    started = time.monotonic()
    exporter.close()
    # prometheus_client's own server polls for a shutdown every 0.5 s: 0.25 s on average.
    assert time.monotonic() - started < 0.2
    with socket.socket() as again:  # the port is free again (the scrapes' own are closing)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", exporter.port))
        again.listen()


def test_an_ipv6_host_gets_an_ipv6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        exporter = Exporter("::1", 0, registry_with_a_counter())
    except OSError as exc:  # IPv6 compiled in but ::1 not configured
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        text = httpx.get(f"http://[::1]:{exporter.port}/metrics", timeout=5).text
        assert "shunter_test_events_total 3.0" in text
    finally:
        exporter.close()
