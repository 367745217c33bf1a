"""Every policy's choices: ties, one worker, none available, fleets changing under them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shunter.fleet.worker import Worker
from shunter.policies.base import RouteRequest, least_loaded
from shunter.policies.bucket import BucketPolicy
from shunter.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from shunter.policies.consistent_hashing import ConsistentHashingPolicy
from shunter.policies.factory import BUILT, PolicyError, PolicySettings, create_policy
from shunter.policies.manual import ManualPolicy
from shunter.policies.power_of_two import PowerOfTwoPolicy
from shunter.policies.prefix_hash import PrefixHashPolicy
from shunter.policies.random import RandomPolicy
from shunter.policies.registry import PolicyRegistry
from shunter.policies.round_robin import RoundRobinPolicy
from shunter.policies.tree import Tree

from support.fakes import make_worker

REQ = RouteRequest()


def fleet(n: int, unhealthy: tuple[int, ...] = (), model: str = "m") -> tuple[Worker, ...]:
    return tuple(
        make_worker(f"http://w{i}", models=(model,), healthy=i not in unhealthy) for i in range(n)
    )


def text_request(text: str, **kw: object) -> RouteRequest:
    return RouteRequest("m", text, **kw)  # type: ignore[arg-type]


def headers_request(**headers: str) -> RouteRequest:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return RouteRequest("m", None, raw)


# --- every policy ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_policy_handles_none_one_and_no_available(name: str) -> None:
    policy = create_policy(name)
    request = RouteRequest("m", "some text", [(b"x-smg-routing-key", b"k")], "k")
    assert policy.select((), request) is None
    only = fleet(1)
    assert all(policy.select(only, request) is only[0] for _ in range(5))
    assert policy.select(fleet(3, unhealthy=(0, 1, 2)), request) is None
    survivors = fleet(3, unhealthy=(0, 2))
    assert all(policy.select(survivors, request) is survivors[1] for _ in range(5))


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_policy_survives_the_fleet_changing_under_it(name: str) -> None:
    policy = create_policy(name)
    big = fleet(5)
    for worker in big:
        policy.on_worker_added(worker)
    for i in range(20):
        assert policy.select(big, text_request(f"prompt {i % 3} " * 20)) in big
    small = big[:2]
    for worker in big[2:]:
        policy.on_worker_removed(worker)
    for i in range(20):
        assert policy.select(small, text_request(f"prompt {i % 3} " * 20)) in small


# --- round_robin and random ------------------------------------------------------------------


def test_round_robin_cycles_in_order_and_skips_unavailable() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.select(fleet(3), REQ) for _ in range(6)]
    assert [w.url for w in picks if w] == ["http://w0", "http://w1", "http://w2"] * 2
    workers = fleet(4, unhealthy=(1, 2))
    policy = RoundRobinPolicy()
    picks = [policy.select(workers, REQ) for _ in range(4)]
    assert [w.url for w in picks if w] == ["http://w0", "http://w3", "http://w0", "http://w3"]


def test_random_is_uniform_over_available_workers() -> None:
    policy = RandomPolicy(random.Random(7))
    workers = fleet(4, unhealthy=(2,))
    counts = Counter(policy.select(workers, REQ).url for _ in range(6000))  # type: ignore[union-attr]
    assert set(counts) == {"http://w0", "http://w1", "http://w3"}
    assert all(1700 < c < 2300 for c in counts.values()), counts


def test_least_loaded_breaks_ties_by_rotating() -> None:
    workers = fleet(3)
    assert Counter(least_loaded(workers).url for _ in range(30)) == {  # type: ignore[union-attr]
        "http://w0": 10,
        "http://w1": 10,
        "http://w2": 10,
    }
    workers[1].state.in_flight = 0
    workers[0].state.in_flight = workers[2].state.in_flight = 2
    assert all(least_loaded(workers) is workers[1] for _ in range(5))


# --- power_of_two --------------------------------------------------------------------------


def test_power_of_two_compares_reported_loads_when_both_are_known() -> None:
    a, b = fleet(2)
    a.state.reported_load, b.state.reported_load = 500, 20
    a.state.in_flight, b.state.in_flight = 0, 5
    policy = PowerOfTwoPolicy(random.Random(1))
    assert all(policy.select((a, b), REQ) is b for _ in range(20))


def test_power_of_two_never_takes_an_unreadable_load_for_idle() -> None:
    # smg turned a failed load read into -1, so the failing worker always won.
    failing, busy = fleet(2)
    failing.state.reported_load, busy.state.reported_load = None, 1000
    failing.state.in_flight, busy.state.in_flight = 7, 2
    policy = PowerOfTwoPolicy(random.Random(2))
    assert all(policy.select((failing, busy), REQ) is busy for _ in range(20))


def test_power_of_two_spreads_by_in_flight_without_reports() -> None:
    workers = fleet(4)
    policy = PowerOfTwoPolicy(random.Random(3))
    for _ in range(400):
        chosen = policy.select(workers, REQ)
        assert chosen is not None
        chosen.state.in_flight += 1
    loads = [w.in_flight for w in workers]
    assert max(loads) - min(loads) <= 2, loads


# --- cache_aware -----------------------------------------------------------------------------


def test_tree_matches_whole_and_partial_edges_and_splits() -> None:
    tree = Tree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    matched, tenants = tree.match("hello world, again")
    assert matched == 11 and set(tenants) == {"a"}
    assert tenants["a"] == pytest.approx(tree.match("hello world")[1]["a"])
    matched, tenants = tree.match("hello thx")
    assert matched == 8 and set(tenants) == {"b"}
    matched, tenants = tree.match("help")
    assert matched == 3 and set(tenants) == {"a", "b"}
    assert tree.match("xyz") == (0, {})
    assert tree.tenant_chars == {"a": 11, "b": 11}


def test_tree_remove_tenant_prunes_its_nodes() -> None:
    tree = Tree()
    tree.insert("shared prefix one", "a")
    tree.insert("shared prefix two", "b")
    tree.remove_tenant("a")
    assert "a" not in tree.tenant_chars
    matched, tenants = tree.match("shared prefix one")
    assert set(tenants) == {"b"} and matched == len("shared prefix ")


def test_tree_eviction_drops_least_recent_leaves_until_each_tenant_fits() -> None:
    tree = Tree()
    for i in range(50):
        tree.insert(f"prompt number {i:03d} " + "x" * 100, "a", now=float(i))
    assert tree.tenant_chars["a"] > 1000
    assert tree.evict(1000)
    assert tree.tenant_chars["a"] <= 1000
    assert tree.match("prompt number 049 " + "x" * 100)[0] > 100  # the newest survive
    assert tree.match("prompt number 000 " + "x" * 100)[0] < 20  # the oldest went


def test_cache_aware_keeps_a_prefix_on_one_worker_and_spreads_new_ones() -> None:
    workers = fleet(4)
    policy = CacheAwarePolicy()
    systems = [f"system prompt {s} " + "context " * 200 for s in range(4)]
    homes: dict[int, set[str]] = {s: set() for s in range(4)}
    for user in range(10):
        for s, system in enumerate(systems):
            chosen = policy.select(workers, text_request(system + f"user {user} question"))
            assert chosen is not None
            homes[s].add(chosen.url)
    assert all(len(urls) == 1 for urls in homes.values()), homes
    assert len({next(iter(u)) for u in homes.values()}) == 4  # each prompt its own worker


def test_cache_aware_gives_each_worker_an_equal_share_of_new_prompts() -> None:
    workers = fleet(8)
    policy = CacheAwarePolicy()
    counts: Counter[str] = Counter()
    for s in range(32):  # prompts of different lengths: no two caches are ever equal
        chosen = policy.select(workers, text_request(f"system {s} " + "words " * (300 + 7 * s)))
        assert chosen is not None
        counts[chosen.url] += 1
    assert sorted(counts.values()) == [4] * 8


def test_gateways_with_the_same_view_spread_the_new_prompts_they_place_at_once() -> None:
    """Peered gateways hold the same trees; placing different new prompts before they hear
    of each other, they must not all pick the one smallest worker."""
    workers = fleet(8)
    history = [f"old prompt {s} " + "words " * (300 + 11 * s) for s in range(8)]
    gateways = [CacheAwarePolicy() for _ in range(8)]
    first = gateways[0]
    for text in history:
        chosen = first.select(workers, text_request(text))
        assert chosen is not None
        for other in gateways[1:]:
            other.insert_remote("m", text, chosen.url)
    placed = [
        gateway.select(workers, text_request(f"new prompt {g} " + "words " * 320))
        for g, gateway in enumerate(gateways)
    ]
    assert len({w.url for w in placed if w is not None}) >= 5, [w and w.url for w in placed]
    # The same new prompt arriving at two of them at once still goes to one worker.
    same = "one more new prompt " + "words " * 320
    assert gateways[1].select(workers, text_request(same)) is gateways[2].select(
        workers, text_request(same)
    )


def test_cache_aware_tells_its_listener_which_decisions_placed_a_new_prefix() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    heard: list[tuple[str, str, str, bool]] = []
    policy.decisions = lambda *decision: heard.append(decision)
    text = "a shared system prompt " * 20
    first = policy.select(workers, text_request(text + "one"))
    policy.select(workers, text_request(text + "two"))
    assert first is not None
    assert heard == [("m", text + "one", first.url, True), ("m", text + "two", first.url, False)]


def test_cache_aware_goes_to_the_least_loaded_when_imbalanced() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy(CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    text = "a long shared prompt " * 20
    first = policy.select(workers, text_request(text))
    assert first is not None
    first.state.in_flight = 10
    other = workers[1] if first is workers[0] else workers[0]
    assert policy.select(workers, text_request(text)) is other


def test_cache_aware_skips_a_matched_worker_that_is_unavailable_or_removed() -> None:
    workers = fleet(3)
    policy = CacheAwarePolicy()
    text = "remember me " * 50
    home = policy.select(workers, text_request(text))
    assert home is not None
    home.state.retired()
    second = policy.select(workers, text_request(text))
    assert second is not None and second is not home
    policy.on_worker_removed(home)
    assert home.url not in policy.tree_for("m").tenant_chars


async def test_cache_aware_trims_as_soon_as_a_worker_exceeds_max_tree_size() -> None:
    import asyncio

    policy = CacheAwarePolicy(CacheAwareConfig(max_tree_size=5000, eviction_interval_secs=3600))
    policy.start()
    try:
        workers = fleet(2)
        for i in range(100):
            policy.select(workers, text_request(f"distinct prompt {i} " + "z" * 200))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if max(policy.tree_for("m").tenant_chars.values()) <= 5000:
                break
        assert max(policy.tree_for("m").tenant_chars.values()) <= 5000
    finally:
        await policy.stop()


async def test_cache_aware_eviction_keeps_trees_within_max_tree_size() -> None:
    policy = CacheAwarePolicy(CacheAwareConfig(max_tree_size=5000))
    workers = fleet(2)
    for i in range(200):
        policy.select(workers, text_request(f"distinct prompt {i} " + "y" * 200))
    assert max(policy.tree_for("m").tenant_chars.values()) > 5000
    await policy.evict_all()
    assert max(policy.tree_for("m").tenant_chars.values()) <= 5000


# --- consistent_hashing and prefix_hash ----------------------------------------------------


def test_consistent_hashing_is_sticky_per_key_and_moves_few_keys_on_growth() -> None:
    policy = ConsistentHashingPolicy(random.Random(4))
    workers = fleet(4)
    before = {
        k: policy.select(workers, headers_request(x_smg_routing_key=f"user-{k}"))
        for k in range(400)
    }
    again = {
        k: policy.select(workers, headers_request(x_smg_routing_key=f"user-{k}"))
        for k in range(400)
    }
    assert before == again
    grown = (*workers, make_worker("http://w4", models=("m",), healthy=True))
    after = {
        k: policy.select(grown, headers_request(x_smg_routing_key=f"user-{k}")) for k in range(400)
    }
    moved = sum(1 for k in before if after[k] is not before[k])
    assert 30 < moved < 150  # about 1/5 of the keys move, all of them to the new worker
    assert all(after[k].url == "http://w4" for k in before if after[k] is not before[k])  # type: ignore[union-attr]


def test_consistent_hashing_target_header_and_implicit_keys() -> None:
    policy = ConsistentHashingPolicy()
    workers = fleet(3, unhealthy=(2,))
    assert policy.select(workers, headers_request(x_smg_target_worker="1")) is workers[1]
    assert policy.select(workers, headers_request(x_smg_target_worker="http://w0")) is workers[0]
    assert policy.select(workers, headers_request(x_smg_target_worker="2")) is None
    assert policy.select(workers, headers_request(x_smg_target_worker="9")) is None
    by_auth = {
        policy.select(workers, headers_request(authorization="Bearer u1")) for _ in range(10)
    }
    assert len(by_auth) == 1


def test_prefix_hash_keeps_a_prefix_together_until_its_worker_is_overloaded() -> None:
    policy = PrefixHashPolicy()
    workers = fleet(4)
    prefix = "system: you are terse. " * 60
    picks = {policy.select(workers, text_request(prefix + f"user {u}")) for u in range(20)}
    assert len(picks) == 1
    home = picks.pop()
    assert home is not None
    home.state.in_flight = 20
    assert policy.select(workers, text_request(prefix + "user 99")) is not home


# --- manual and bucket ---------------------------------------------------------------------


def test_manual_is_sticky_by_key_and_reassigns_when_its_worker_leaves() -> None:
    policy = ManualPolicy(max_idle_secs=100, rng=random.Random(5))
    workers = fleet(3)
    first = policy.select(workers, headers_request(x_smg_routing_key="session-1"))
    assert all(
        policy.select(workers, headers_request(x_smg_routing_key="session-1")) is first
        for _ in range(10)
    )
    by_body = policy.select(workers, RouteRequest("m", None, None, "session-2"))
    assert policy.select(workers, RouteRequest("m", None, None, "session-2")) is by_body
    assert first is not None
    first.state.retired()
    moved = policy.select(workers, headers_request(x_smg_routing_key="session-1"))
    assert moved is not None and moved is not first
    assert policy.sweep(now=10**9) == 2  # both keys idle far past max_idle_secs
    assert len(policy.assignments) == 0


def test_bucket_routes_by_prompt_length_and_adjusts_boundaries() -> None:
    policy = BucketPolicy(adjust_interval_secs=60, balance_abs_threshold=10**9)
    workers = fleet(2)
    short = policy.select(workers, text_request("x" * 100))
    long = policy.select(workers, text_request("x" * 3000))
    assert short is not None and long is not None and short is not long
    for _ in range(50):
        policy.select(workers, text_request("x" * 100))
    policy.select(workers, text_request("x" * 300))
    policy.adjust()
    assert policy.models["m"].upper[0] <= 101  # the boundary moved down to split the load


# --- per-model policies and plugins -------------------------------------------------------


def test_a_worker_label_picks_its_models_policy() -> None:
    settings = PolicySettings()
    registry = PolicyRegistry(create_policy("round_robin"), settings)
    labelled = make_worker("http://a", models=("llama",), labels={"policy": "consistent_hashing"})
    plain = make_worker("http://b", models=("qwen",))
    registry.on_worker_added(labelled)
    registry.on_worker_added(plain)
    assert registry.policy_for("llama").name == "consistent_hashing"
    assert registry.policy_for("qwen") is registry.default
    registry.on_worker_removed(labelled)
    assert registry.policy_for("llama") is registry.default


def test_plugins_load_from_module_colon_class() -> None:
    policy = create_policy("support.plugins.lightest_first:LightestFirst")
    workers = fleet(3)
    workers[0].state.in_flight = 3
    assert policy.select(workers, REQ) is workers[1]
    with pytest.raises(PolicyError, match="cannot import"):
        create_policy("no_such_plugin_module:Nope")
    with pytest.raises(PolicyError, match="subclass"):
        create_policy("json:JSONDecoder")


# --- least_load ----------------------------------------------------------------------------


def test_least_load_takes_the_lowest_reported_load_whatever_is_in_flight() -> None:
    workers = fleet(3)
    for worker, load, in_flight in zip(workers, (900, 40, 300), (0, 6, 1), strict=True):
        worker.state.reported_load, worker.state.in_flight = load, in_flight
    policy = create_policy("least_load")
    decisions = [policy.decide(workers, REQ) for _ in range(6)]
    assert all(d.worker is workers[1] and d.reason == "least_load" for d in decisions)


def test_least_load_breaks_equal_reports_by_in_flight_then_by_rotating() -> None:
    workers = fleet(3)
    for worker in workers:
        worker.state.reported_load = 100
    workers[0].state.in_flight, workers[1].state.in_flight, workers[2].state.in_flight = 3, 1, 1
    policy = create_policy("leastload")  # smg's spelling without the underscore
    chosen = Counter(policy.select(workers, REQ).url for _ in range(20))  # type: ignore[union-attr]
    assert chosen == {"http://w1": 10, "http://w2": 10}


def test_least_load_compares_in_flight_alone_when_a_worker_has_no_report() -> None:
    # An unknown load is not "zero": the worker that could not be read is not taken for idle,
    # nor is the reporting worker judged on a figure the other lacks.
    unread, busy_report = fleet(2)
    unread.state.reported_load, busy_report.state.reported_load = None, 5000
    unread.state.in_flight, busy_report.state.in_flight = 4, 1
    decision = create_policy("least_load").decide((unread, busy_report), REQ)
    assert decision.worker is busy_report and decision.reason == "least_in_flight"


def test_least_load_spreads_by_in_flight_without_reports_and_skips_unavailable() -> None:
    workers = fleet(4, unhealthy=(2,))
    policy = create_policy("least_load")
    for _ in range(300):
        chosen = policy.select(workers, REQ)
        assert chosen is not None and chosen is not workers[2]
        chosen.state.in_flight += 1
    loads = [w.in_flight for i, w in enumerate(workers) if i != 2]
    assert max(loads) - min(loads) <= 1, loads


def test_least_load_is_taken_by_the_flags_and_the_policy_label() -> None:
    from shunter.cli import serve_config

    config = serve_config(
        ["--policy", "least_load", "--pd-disaggregation", "--decode-policy", "least_load"]
    )
    assert config.policy == "least_load" and config.decode_policy == "least_load"
    registry = PolicyRegistry(create_policy("round_robin"), PolicySettings())
    registry.on_worker_added(
        make_worker("http://a", models=("llama",), labels={"policy": "least_load"})
    )
    assert registry.policy_for("llama").name == "least_load"
