"""A chat request reaches the policy with its body (``RouteRequest.chat``), so a precise
scorer can render it as the engine does; other requests, and policies that read no text,
get none. Both the regular router and the prefill/decode pair selector."""

from __future__ import annotations

import orjson

from shunter.fleet.registry import WorkerRegistry, Workers
from shunter.fleet.worker import Worker, WorkerType
from shunter.observability.metrics import Metrics
from shunter.policies.base import Policy, RouteRequest
from shunter.policies.factory import PolicySettings
from shunter.policies.registry import PolicyRegistry
from shunter.routing.pd.pairs import PairSelector
from shunter.routing.request import InferenceRequest
from shunter.routing.router import Router

from support.fakes import make_worker

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi there"}]})
COMPLETION = orjson.dumps({"model": "m", "prompt": "hi there"})


class Recording(Policy):
    name = "recording"

    def __init__(self, needs_text: bool = True) -> None:
        self.needs_text = needs_text
        self.seen: list[RouteRequest] = []

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        self.seen.append(request)
        return workers[0]


def _request(body: bytes, path: str = "/v1/chat/completions") -> InferenceRequest:
    return InferenceRequest("POST", path, b"", [], body, "r1")


def test_the_router_hands_a_chats_body_to_a_policy_that_reads_text() -> None:
    registry = WorkerRegistry()
    registry.register(make_worker("http://a:1"))
    for needs_text, body, path, expected in (
        (True, CHAT, "/v1/chat/completions", CHAT),
        (True, COMPLETION, "/v1/completions", None),
        (False, CHAT, "/v1/chat/completions", None),
    ):
        policy = Recording(needs_text)
        router = Router(registry, PolicyRegistry(policy, PolicySettings()), Metrics())
        router.select(_request(body, path))
        assert policy.seen[-1].chat == expected
        assert policy.seen[-1].text == ("hi there" if needs_text else None)


def test_the_pair_selector_hands_a_chats_body_to_both_legs() -> None:
    registry = WorkerRegistry()
    registry.register(make_worker("http://p:1", worker_type=WorkerType.PREFILL))
    registry.register(make_worker("http://d:1", worker_type=WorkerType.DECODE))
    prefill, decode = Recording(), Recording()
    selector = PairSelector(
        registry,
        PolicyRegistry(prefill, PolicySettings(), WorkerType.PREFILL),
        PolicyRegistry(decode, PolicySettings(), WorkerType.DECODE),
    )
    selector.select(_request(CHAT), "m")
    assert prefill.seen[-1].chat == CHAT and decode.seen[-1].chat == CHAT
    selector.select(_request(COMPLETION, "/v1/completions"), "m")
    assert prefill.seen[-1].chat is None
