"""Sticky sessions on any policy (``--routing-key-override``) and ``X-SMG-Target-Worker``,
through a whole gateway on a mock network."""

from __future__ import annotations

import pytest

from shunter.config import ConfigError, GatewayConfig
from shunter.gateway import Gateway
from shunter.policies.keys import KeyMemory
from shunter.routing.retry import RetryConfig
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, ok, pd_gateway, ready

URLS = ("http://w:1", "http://w:2", "http://w:3")
NO_RETRIES = RetryConfig(disabled=True)
FAST_RETRIES = RetryConfig(initial_backoff_ms=1, max_backoff_ms=1)


def served_by(answer_url: str) -> str:
    return answer_url.rsplit("/v1/", 1)[0]


class Recorder(Workers):
    """Every worker answers 200; ``last`` is the base URL of the last one asked."""

    def __init__(self) -> None:
        super().__init__(self.answer)
        self.last = ""
        self.failing: set[str] = set()  # these answer 503

    def answer(self, request: MockRequest) -> MockResponse:
        self.last = served_by(request.url)
        if self.last in self.failing:
            return MockResponse(503, body=b'{"error": "busy"}')
        return ok(request)


async def send(gw: Gateway, network: Recorder, *headers: tuple[bytes, bytes]) -> str:
    answer = await call(gw.app, "POST", "/v1/completions", b'{"prompt": "x"}', list(headers))
    assert answer.status == 200, answer.body
    return network.last


def key(value: str, header: bytes = b"x-smg-routing-key") -> tuple[bytes, bytes]:
    return header, value.encode()


def worker(gw: Gateway, url: str):  # type: ignore[no-untyped-def]
    return gw.fleet.registry.get_by_url(url)


# --- sticky sessions -------------------------------------------------------------------------


async def test_a_key_keeps_its_worker_on_a_policy_that_would_rotate() -> None:
    network = Recorder()
    gw = gateway(URLS, network=network, routing_key_override=True, route_receipt=True)
    await ready(gw)
    first = await send(gw, network, key("session-a"))
    assert {await send(gw, network, key("session-a")) for _ in range(6)} == {first}
    # Without a key, round_robin as ever.
    assert len({await send(gw, network) for _ in range(3)}) == 3
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", [key("session-a")])
    assert b"reason=sticky" in (answer.header(b"x-shunter-route") or b"")
    await gw.close()


async def test_without_the_flag_a_key_does_not_stick() -> None:
    network = Recorder()
    gw = gateway(URLS, network=network)
    await ready(gw)
    assert len({await send(gw, network, key("session-a")) for _ in range(3)}) == 3
    assert gw.router.sticky is None
    await gw.close()


async def test_a_key_waits_out_its_workers_unavailability_and_moves_when_it_is_removed() -> None:
    network = Recorder()
    gw = gateway(URLS, network=network, routing_key_override=True)
    await ready(gw)
    home = await send(gw, network, key("k"))
    worker(gw, home).state.exclude(True)  # its breaker opened
    elsewhere = {await send(gw, network, key("k")) for _ in range(4)}
    assert home not in elsewhere
    worker(gw, home).state.exclude(False)
    assert await send(gw, network, key("k")) == home  # back where its cache is
    gw.fleet.remove(home)
    moved = await send(gw, network, key("k"))
    assert moved != home
    assert {await send(gw, network, key("k")) for _ in range(4)} == {moved}  # sticks anew
    await gw.close()


async def test_a_retry_that_avoids_the_keys_worker_does_not_move_the_key() -> None:
    network = Recorder()
    gw = gateway(URLS, network=network, routing_key_override=True, retry=FAST_RETRIES)
    await ready(gw)
    home = await send(gw, network, key("k"))
    network.failing.add(home)
    assert await send(gw, network, key("k")) != home  # retried on another worker
    network.failing.clear()
    assert await send(gw, network, key("k")) == home
    await gw.close()


async def test_the_key_comes_from_the_smg_header_then_the_named_headers_in_order() -> None:
    network = Recorder()
    gw = gateway(
        URLS,
        network=network,
        routing_key_override=True,
        routing_key_headers=["X-Session-Id", "X-User"],
    )
    await ready(gw)
    by_user = await send(gw, network, key("u1", b"x-user"))
    # A session id outranks the user; the smg header outranks both.
    assert await send(gw, network, key("u1", b"x-user"), key("s1", b"x-session-id")) != by_user
    by_session = await send(gw, network, key("s1", b"x-session-id"))
    assert await send(gw, network, key("u1", b"x-user"), key("s1", b"x-session-id")) == by_session
    by_smg = await send(gw, network, key("z"))
    both = (key("s1", b"x-session-id"), key("z"))
    assert by_smg != by_session and await send(gw, network, *both) == by_smg
    await gw.close()


async def test_each_leg_of_a_pair_keeps_its_worker() -> None:
    network = Recorder()
    gw = pd_gateway(
        ("http://p:1", "http://p:2"),
        ("http://d:1", "http://d:2"),
        network,
        routing_key_override=True,
    )
    await ready(gw, 4)
    for _ in range(4):
        assert (await call(gw.app, "POST", "/generate", b'{"text": "x"}', [key("k")])).status == 200
    urls = ("http://p:1", "http://p:2", "http://d:1", "http://d:2")
    counts = {url: len(network.requests(url)) for url in urls}
    # round_robin would have split each leg 2 and 2: the key keeps one worker on each.
    assert sorted(counts.values()) == [0, 0, 4, 4], counts
    await gw.close()


def test_key_memory_is_bounded_by_count_and_idle_age() -> None:
    memory: KeyMemory[str] = KeyMemory(max_idle_secs=10, max_keys=3)
    for name in "abc":
        memory.put(name, name.upper())
    memory.put("a", "A")  # used again: now the most recent
    memory.put("d", "D")  # over the bound: the least recently used ("b") goes
    assert [memory.get(n) for n in "abcd"] == ["A", None, "C", "D"]
    assert memory.sweep(now=0) == 0
    assert memory.sweep(now=10**9) == 3 and len(memory) == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"routing_key_headers": ["x-session"]}, "needs --routing-key-override"),
        ({"routing_key_override": True, "routing_key_headers": ["bad header"]}, "header name"),
        ({"routing_key_override": True, "workers": 2}, "--policy consistent_hashing"),
    ],
)
def test_bad_sticky_settings_are_refused_at_start(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(**settings).validate()  # type: ignore[arg-type]


# --- X-SMG-Target-Worker ---------------------------------------------------------------------


def target(name: str) -> tuple[bytes, bytes]:
    return b"x-smg-target-worker", name.encode()


@pytest.mark.parametrize("policy", ["round_robin", "cache_aware", "least_load", "manual"])
async def test_every_policy_honours_the_target_worker(policy: str) -> None:
    network = Recorder()
    gw = gateway(URLS, network=network, policy=policy, route_receipt=True)
    await ready(gw)
    by_id = worker(gw, "http://w:2").id
    for name in ("http://w:2", "http://w:2/", "1", by_id, by_id.upper()):  # URL, index, id
        assert await send(gw, network, target(name), key("k")) == "http://w:2"
    answer = await call(gw.app, "POST", "/v1/completions", b"{}", [target("http://w:3")])
    assert b"reason=target_worker" in (answer.header(b"x-shunter-route") or b"")
    await gw.close()


async def test_an_unknown_or_unavailable_target_is_an_error_naming_it() -> None:
    network = Recorder()
    gw = gateway(URLS, network=network, retry=NO_RETRIES)
    await ready(gw)
    unknown = await call(gw.app, "POST", "/v1/completions", b"{}", [target("http://w:9")])
    assert unknown.status == 400
    assert unknown.json()["error"]["code"] == "target_worker_not_found"
    assert "http://w:9" in unknown.json()["error"]["message"]
    worker(gw, "http://w:2").state.exclude(True)
    down = await call(gw.app, "POST", "/v1/completions", b"{}", [target("http://w:2")])
    assert down.status == 503 and down.json()["error"]["code"] == "target_worker_unavailable"
    message = down.json()["error"]["message"]
    assert worker(gw, "http://w:2").id in message and "http://w:2" not in message  # no address
    # A number too long to be an index (int() refuses over 4,300 digits) is no worker: a 400.
    huge = await call(gw.app, "POST", "/v1/completions", b"{}", [target("7" * 5000)])
    assert huge.status == 400 and len(huge.json()["error"]["message"]) < 400
    assert network.last == ""  # no worker was asked: no fallback to the policy
    await gw.close()


async def test_a_target_pins_the_leg_whose_pool_holds_it() -> None:
    network = Recorder()
    gw = pd_gateway(("http://p:1", "http://p:2"), ("http://d:1", "http://d:2"), network)
    await ready(gw, 4)
    for _ in range(3):
        before = sum(len(network.requests(u)) for u in ("http://d:1", "http://d:2"))
        assert (
            await call(gw.app, "POST", "/generate", b'{"text": "x"}', [target("http://d:2")])
        ).status == 200
        after = sum(len(network.requests(u)) for u in ("http://d:1", "http://d:2"))
        assert after == before + 1
    assert len(network.requests("http://d:1")) == 0 and len(network.requests("http://d:2")) == 3
    assert len(network.requests("http://p:1")) + len(network.requests("http://p:2")) == 3
    await gw.close()


def test_the_flags_and_smgs_alias() -> None:
    from shunter.cli import serve_config

    config = serve_config(["--sticky-sessions", "--routing-key-headers", "X-Session-Id"])
    assert config.routing_key_override and config.routing_key_headers == ["x-session-id"]
    assert serve_config(["--routing-key-override"]).routing_key_override
    settings = serve_config(["--max-routing-keys", "10"]).policy_settings
    assert settings.max_routing_keys == 10
