"""Precise cache_aware end to end: two sims publish their prefix caches' KV events, the
gateway subscribes (one worker from the command line, one from POST /workers) and routes a
prompt to the sim whose engine holds it, and forgets a sim's blocks when its cache is
flushed."""

from __future__ import annotations

from typing import Any

import httpx

from support.harness import Gateway, Proc, Sim, free_port, wait_for


def _sim(name: str) -> tuple[Sim, str, str]:
    events, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    sim = Sim(name, "--kv-events-endpoint", events, "--kv-events-replay-endpoint", replay)
    return sim, events, replay


def _prompt(topic: str, words: int = 64) -> str:
    return " ".join(f"{topic}{i}" for i in range(words))


def _generate(url: str, text: str) -> None:
    body = {"text": text, "sampling_params": {"max_new_tokens": 1}}
    httpx.post(url + "/generate", json=body, timeout=10).raise_for_status()


def _kv_events(gateway: Gateway) -> dict[str, Any]:
    return httpx.get(gateway.url + "/dashboard/data", timeout=5).json()["kv_events"]  # type: ignore[no-any-return]


def _blocks(gateway: Gateway, sim: Sim) -> int:
    return int(_kv_events(gateway).get(sim.url, {}).get("blocks", -1))


def test_a_prompt_routes_to_the_sim_whose_engine_holds_it(procs: list[Proc]) -> None:
    (a, a_events, a_replay), (b, b_events, b_replay) = _sim("sim-a"), _sim("sim-b")
    procs += [a, b]
    gateway = Gateway(
        "--policy",
        "cache_aware",
        "--kv-events-endpoint",
        f"{a.url}={a_events},{a_replay}",
        workers=[a.url],
    )
    procs.append(gateway)
    added = httpx.post(
        gateway.url + "/workers",
        json={"url": b.url, "kv_events_endpoint": b_events, "kv_events_replay_endpoint": b_replay},
        timeout=5,
    )
    assert added.status_code < 300, added.text
    gateway.wait_workers(2)
    wait_for(lambda: set(_kv_events(gateway)) == {a.url, b.url}, 5, "both subscribed")

    # Warm the sims' caches directly: only the events tell the gateway where prompts are.
    warm = {"p": a, "r": a, "q": b}
    for topic, sim in warm.items():
        _generate(sim.url, _prompt(topic))
    wait_for(lambda: _blocks(gateway, a) == 8 and _blocks(gateway, b) == 4, 5, "events applied")

    # Routed in this order, a policy that does not know the caches cannot pick a, a, b: the
    # approximate tree is empty, and new prefixes alternate between the sims.
    for topic in ("p", "r", "q"):
        before = {s.name: s.stats()["requests_total"] for s in (a, b)}
        _generate(gateway.url, _prompt(topic) + " and a question")
        after = {s.name: s.stats()["requests_total"] for s in (a, b)}
        chosen = [name for name in after if after[name] > before[name]]
        assert chosen == [warm[topic].name], topic

    # A flush reaches the gateway as AllBlocksCleared: a's blocks are forgotten, so once b
    # holds part of p, p goes to b although a held all of it. (a is given another prompt,
    # s, first: left empty, it would draw p by the engines' rebalancing, 6 blocks against 0,
    # and a plan made in that moment lasts up to 100 ms.)
    httpx.post(a.url + "/flush_cache", timeout=5).raise_for_status()
    wait_for(lambda: _blocks(gateway, a) == 0, 5, "a's blocks forgotten")
    _generate(a.url, _prompt("s"))
    wait_for(lambda: _blocks(gateway, a) == 4, 5, "a's new blocks")
    _generate(b.url, _prompt("p", 32))
    wait_for(lambda: _blocks(gateway, b) >= 6 and _blocks(gateway, a) == 4, 5, "new blocks")
    before_b = b.stats()["requests_total"]
    _generate(gateway.url, _prompt("p"))
    assert b.stats()["requests_total"] == before_b + 1

    # A worker removed: its subscriber is closed and its blocks dropped.
    httpx.delete(f"{gateway.url}/workers/{b.url}", timeout=5)
    wait_for(lambda: set(_kv_events(gateway)) == {a.url}, 5, "b unsubscribed")


def test_an_sglang_workers_events_endpoint_is_read_from_its_server_info(
    procs: list[Proc],
) -> None:
    sim, _, _ = _sim("sim-c")  # advertises its endpoint in /server_info, as SGLang does
    procs.append(sim)
    gateway = Gateway("--policy", "cache_aware", workers=[sim.url])  # no endpoint given
    procs.append(gateway)
    gateway.wait_workers(1)
    wait_for(lambda: sim.url in _kv_events(gateway), 5, "subscribed from the server info")
    _generate(sim.url, _prompt("s"))
    wait_for(lambda: _blocks(gateway, sim) == 4, 5, "the advertised events applied")


def _chat(url: str, messages: list[dict[str, str]]) -> None:
    body = {"model": "sim", "messages": messages, "max_tokens": 1}
    httpx.post(url + "/v1/chat/completions", json=body, timeout=10).raise_for_status()


def test_a_chat_routes_to_the_sim_that_cached_its_templated_prompt(procs: list[Proc]) -> None:
    """The sims cache a chat as their template renders it (``<|system|> ... <|assistant|>``):
    the gateway scores the same rendering, not the contents joined, so it finds the blocks."""
    (a, a_events, _), (b, b_events, _) = _sim("sim-a"), _sim("sim-b")
    procs += [a, b]
    gateway = Gateway(
        "--policy",
        "cache_aware",
        "--kv-events-endpoint",
        f"{a.url}={a_events}",
        "--kv-events-endpoint",
        f"{b.url}={b_events}",
        workers=[a.url, b.url],
    )
    procs.append(gateway)
    gateway.wait_workers(2)
    wait_for(lambda: set(_kv_events(gateway)) == {a.url, b.url}, 5, "both subscribed")

    def conversation(topic: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": _prompt(topic)},
            {"role": "user", "content": f"a first question about {topic}"},
        ]

    warm = {"p": a, "r": a, "q": b}
    for topic, sim in warm.items():
        _chat(sim.url, conversation(topic))
    wait_for(lambda: _blocks(gateway, a) == 8 and _blocks(gateway, b) == 4, 5, "events applied")

    # The next turn of each conversation, routed in an order that a policy blind to the
    # engines' caches cannot follow (new prefixes alternate between the sims).
    for topic in ("p", "r", "q"):
        before = {s.name: s.stats()["requests_total"] for s in (a, b)}
        turn = [
            *conversation(topic),
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "and a second question"},
        ]
        _chat(gateway.url, turn)
        after = {s.name: s.stats()["requests_total"] for s in (a, b)}
        chosen = [name for name in after if after[name] > before[name]]
        assert chosen == [warm[topic].name], topic
