"""Each policy's decision explained (the route receipt's reason and prediction), and
cache_aware's self-correction on the tree."""

from __future__ import annotations

import random

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import CHARS_PER_TOKEN, Decision, Policy, RouteRequest
from shunter.policies.bucket import BucketPolicy
from shunter.policies.cache_aware import (
    CacheAwareConfig,
    CacheAwareDecision,
    CacheAwarePolicy,
)
from shunter.policies.consistent_hashing import ConsistentHashingPolicy
from shunter.policies.manual import ManualPolicy
from shunter.policies.power_of_two import PowerOfTwoPolicy
from shunter.policies.prefix_hash import PrefixHashPolicy
from shunter.policies.random import RandomPolicy
from shunter.policies.round_robin import RoundRobinPolicy
from shunter.policies.tree import Tree

from support.fakes import WithoutUnits, make_worker

SYSTEM = "You are a careful assistant. " * 40  # 1160 characters


def fleet(n: int) -> tuple[Worker, ...]:
    return tuple(make_worker(f"http://w{i}") for i in range(n))


def text(value: str) -> RouteRequest:
    return RouteRequest("m", value)


def keyed(**headers: str) -> RouteRequest:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return RouteRequest("m", None, raw)


# --- every policy has a reason ---------------------------------------------------------------


def test_policies_without_a_record_of_the_caches_give_their_rule_and_predict_nothing() -> None:
    workers = fleet(3)
    for policy, reason in (
        (RoundRobinPolicy(), "round_robin"),
        (RandomPolicy(random.Random(1)), "random"),
        (PowerOfTwoPolicy(random.Random(1)), "less_loaded_of_two"),
    ):
        decision = policy.decide(workers, text("x"))
        assert decision.worker in workers and decision.reason == reason
        assert decision.predicted_cached is None


def test_prefix_hash_says_when_load_overrode_the_ring() -> None:
    workers = fleet(3)
    policy = PrefixHashPolicy()
    first = policy.decide(workers, text(SYSTEM))
    assert first.reason == "prefix_hash" and first.predicted_cached is None
    assert first.worker is not None
    first.worker.state.in_flight = 10
    override = policy.decide(workers, text(SYSTEM))
    assert override.reason == "load_override" and override.worker is not first.worker


def test_consistent_hashing_names_the_header_that_decided() -> None:
    workers = fleet(3)
    policy = ConsistentHashingPolicy(random.Random(1))
    target = policy.decide(workers, keyed(x_smg_target_worker="1"))
    assert (target.worker, target.reason) == (workers[1], "target_worker")
    assert policy.decide(workers, keyed(x_smg_routing_key="k")).reason == "routing_key"
    assert policy.decide(workers, keyed(authorization="Bearer t")).reason == "routing_key"
    assert policy.decide(workers, keyed()).reason == "random"


def test_manual_tells_a_new_key_from_a_sticky_one() -> None:
    workers = fleet(3)
    policy = ManualPolicy(rng=random.Random(1))
    new = policy.decide(workers, keyed(x_smg_routing_key="k"))
    sticky = policy.decide(workers, keyed(x_smg_routing_key="k"))
    assert new.reason == "new_key" and sticky.reason == "sticky"
    assert sticky.worker is new.worker
    assert policy.decide(workers, keyed()).reason == "random"


def test_bucket_tells_its_range_from_an_override_and_a_fallback() -> None:
    workers = fleet(2)
    policy = BucketPolicy(balance_abs_threshold=100, balance_rel_threshold=1.5)
    assert policy.decide(workers, text("short")).reason == "bucket"
    owner = policy.decide(workers, text("y" * 4000))  # the long range's owner
    assert owner.reason == "bucket" and owner.worker is not None
    owner.worker.state.exclude(True)
    assert policy.decide(workers, text("y" * 4000)).reason == "fallback"
    owner.worker.state.exclude(False)
    # The owner now carries 4000 characters to the other's 4005, then 8000: over the
    # bounds, so the next long prompt goes to the other worker instead.
    reasons = [policy.decide(workers, text("z" * 4000)).reason for _ in range(2)]
    assert reasons == ["bucket", "load_override"]


class SelectOnly(Policy):
    """A user's policy written against ``select`` alone."""

    name = "mine"

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return workers[-1]


def test_a_policy_written_against_select_alone_still_decides() -> None:
    workers = fleet(2)
    decision = SelectOnly().decide(workers, text("x"))
    assert decision == Decision(workers[1], "selected", None)
    assert not SelectOnly.learns_from_cache


# --- cache_aware's reasons and predictions ----------------------------------------------------


def test_cache_aware_predicts_the_match_it_followed_in_tokens() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    first = policy.decide(workers, text(SYSTEM + "first question"))
    assert first.reason == "new_prefix" and first.predicted_cached == 0
    again = policy.decide(workers, text(SYSTEM + "second question"))
    assert again.reason == "prefix_match" and again.worker is first.worker
    shared = len(SYSTEM)  # the two texts agree up to the question
    assert again.predicted_cached == shared // CHARS_PER_TOKEN
    assert policy.select(workers, text(SYSTEM + "third")) is first.worker  # select agrees


def test_cache_aware_says_load_override_and_predicts_for_the_worker_it_took() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy(CacheAwareConfig(balance_abs_threshold=2))
    home = policy.decide(workers, text(SYSTEM + "a")).worker
    assert home is not None
    home.state.in_flight = 10
    override = policy.decide(workers, text(SYSTEM + "b"))
    assert override.reason == "load_override" and override.worker is not home
    assert override.predicted_cached == 0  # the other worker was never routed the prompt


def test_cache_aware_reasons_for_one_worker_and_for_no_text() -> None:
    policy = CacheAwarePolicy()
    only = policy.decide(fleet(1), text(SYSTEM))
    assert only.reason == "only_worker" and only.predicted_cached == 0
    again = policy.decide(fleet(1), text(SYSTEM))
    assert again.predicted_cached == len(SYSTEM) // CHARS_PER_TOKEN
    assert policy.decide(fleet(2), text("")).reason == "least_loaded"


class Engines(WithoutUnits):
    """A precise scorer: each worker's exact cached tokens, as KV events would say."""

    active = True

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def tracks(self, url: str) -> bool:
        return url in self.counts

    def cached_tokens(
        self, model: str, text: str, chat: bytes | None = None
    ) -> tuple[int, dict[str, int]]:
        return 300, self.counts

    def held_tokens(self, model: str, url: str) -> int:
        return self.counts.get(url, 0)


def test_precise_cache_aware_predicts_the_engines_exact_count() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy(scorer=Engines({"http://w1": 240}))
    decision = policy.decide(workers, text(SYSTEM))
    assert (decision.worker, decision.reason) == (workers[1], "cached_blocks")
    assert decision.predicted_cached == 240
    assert isinstance(decision, CacheAwareDecision) and decision.exact


# --- the tree: what a worker holds, forgetting what it lost ----------------------------------


def test_tree_held_is_the_deepest_node_the_tenant_is_on() -> None:
    tree = Tree()
    tree.insert("abcdefgh", "a", now=1.0)
    tree.insert("abcdXY", "b", now=2.0)
    tree.insert("abcdefZZ", "a", now=3.0)
    assert tree.held("abcdefgh", "a") == (8, 1.0)
    assert tree.held("abcdefgh", "b") == (4, 2.0)
    assert tree.held("abcdefQQ", "a") == (6, 3.0)
    assert tree.held("zzz", "a") == (0, -1.0)


def test_tree_forget_drops_the_tenant_past_what_it_kept_and_everything_below() -> None:
    tree = Tree()
    tree.insert("abcdefgh", "a", now=1.0)
    tree.insert("abcdefZZ", "a", now=1.0)
    tree.insert("abcdefgh", "b", now=1.0)
    dropped = tree.forget("abcdefgh", "a", keep=3)
    assert dropped == 7  # "def" + "gh" + "ZZ"
    assert tree.held("abcdefgh", "a")[0] == 3
    assert tree.held("abcdefZZ", "a")[0] == 3  # the sibling extension went too
    assert tree.held("abcdefgh", "b")[0] == 8  # another worker keeps its copy
    assert tree.tenant_chars["a"] == 3 and tree.tenant_chars["b"] == 8
    assert tree.forget("abcdefgh", "a", keep=3) == 0  # nothing more to forget


def test_tree_forget_prunes_nodes_no_one_holds() -> None:
    tree = Tree()
    tree.insert("abcdefgh", "a", now=1.0)
    tree.forget("abcdefgh", "a", keep=0)
    assert tree.root.children == {} and tree.tenant_chars["a"] == 0


# --- the self-correction -----------------------------------------------------------------------


ONE = SYSTEM + "one " * 50
TWO = SYSTEM + "two " * 50


def routed_twice(policy: CacheAwarePolicy, workers: tuple[Worker, ...]) -> CacheAwareDecision:
    """Route two texts sharing the system prompt: the second follows the tree's match."""
    policy.decide(workers, text(ONE))
    decision = policy.decide(workers, text(TWO))
    assert isinstance(decision, CacheAwareDecision) and decision.reason == "prefix_match"
    return decision


def answer(policy: CacheAwarePolicy, decision: Decision, cached: int, elapsed: float) -> None:
    prompt = len(TWO) // CHARS_PER_TOKEN
    policy.on_cached(text(TWO), decision, cached, prompt, elapsed)


def test_an_evident_eviction_forgets_what_the_worker_lost_and_keeps_what_it_recached() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    assert policy.learns_from_cache
    decision = routed_twice(policy, workers)
    assert decision.worker is not None
    url, tree = decision.worker.url, policy.trees["m"]
    assert tree.held(ONE, url)[0] == len(ONE)
    answer(policy, decision, cached=0, elapsed=-1.0)  # long after the prefix was routed
    assert policy.corrections == 1
    # The worker lost the system prompt and so the first text's tail with it; answering
    # the second text cached that one anew.
    assert tree.held(ONE, url)[0] == len(SYSTEM)
    assert tree.held(TWO, url)[0] == len(TWO)
    assert tree.tenant_chars[url] == len(TWO)


def test_a_request_is_no_longer_pulled_by_a_long_match_the_worker_lost() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    short = "Be brief. " * 20  # 200 characters
    document = short + "a long document the user pasted " * 40  # the system prompt: 13%
    chat = short + "hello there " * 10  # the system prompt: 62%
    home = policy.decide(workers, text(document)).worker
    assert policy.decide(workers, text(chat)).worker is home
    follow = policy.decide(workers, text(chat + "and more"))
    assert follow.reason == "prefix_match" and follow.worker is home
    policy.on_cached(text(chat + "and more"), follow, 0, len(chat) // 4, -1.0)  # evicted all
    again = policy.decide(workers, text(document + "next question"))
    assert again.reason == "new_prefix"  # the document's stale match no longer pulls it
    # At most the short prompt is still expected (the document's ~370 tokens were before).
    assert again.predicted_cached is not None
    assert again.predicted_cached <= len(short) // CHARS_PER_TOKEN


def test_a_shortfall_within_the_tolerance_is_not_an_eviction() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    decision = routed_twice(policy, workers)
    assert decision.predicted_cached is not None
    answer(policy, decision, cached=decision.predicted_cached - 20, elapsed=-1.0)  # a block
    assert policy.corrections == 0


def test_a_miss_racing_the_prefill_that_put_the_prefix_there_is_not_an_eviction() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    decision = routed_twice(policy, workers)
    # This request took longer than the time since the prefix was last routed to the
    # worker: that request may still have been prefilling when this one looked.
    answer(policy, decision, cached=0, elapsed=decision.decided_at - decision.since + 0.1)
    assert policy.corrections == 0


def test_the_correction_can_be_turned_off() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy(CacheAwareConfig(self_correct=False))
    decision = routed_twice(policy, workers)
    assert decision.worker is not None
    answer(policy, decision, cached=0, elapsed=-1.0)  # as the evident eviction above
    assert policy.corrections == 0
    assert policy.trees["m"].held(ONE, decision.worker.url)[0] == len(ONE)


def test_predictions_follow_the_token_count_the_workers_report() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy()
    first = policy.decide(workers, text(SYSTEM))
    assert first.predicted_cached == 0
    policy.on_cached(text(SYSTEM), first, 0, len(SYSTEM) // 6, 0.0)  # ~6 characters a token
    again = policy.decide(workers, text(SYSTEM + " and more"))
    assert again.reason == "prefix_match" and again.predicted_cached is not None
    assert abs(again.predicted_cached - len(SYSTEM) / 6) <= 2  # not len(SYSTEM) / 4
    # One odd answer moves the ratio by a sixteenth of the difference, not all the way.
    policy.on_cached(text(SYSTEM), again, 0, len(SYSTEM), 0.0)  # 1 character a token
    assert 5.0 < policy.chars_per_token["m"] < 6.0


def test_an_exact_prediction_is_never_corrected_on_the_tree() -> None:
    workers = fleet(2)
    policy = CacheAwarePolicy(scorer=Engines({"http://w1": 240}))
    decision = policy.decide(workers, text(SYSTEM))
    policy.on_cached(text(SYSTEM), decision, 0, 300, -1.0)
    assert policy.corrections == 0
