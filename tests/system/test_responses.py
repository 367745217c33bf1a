"""The Responses API through the gateway, from the ``openai`` SDK: two sims behind a
round-robin gateway, so a request that is not sent to the worker holding its response would
land on the other one every second time.

Which worker answered is the sim's ``x-worker-id``; why, the route receipt's reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from support.harness import Fleet, Gateway, Proc, Sim, stop_all, wait_for

# Long enough for whole cache blocks (the sim's are 16 words): a continuation's prompt then
# starts with blocks the previous turn cached.
LONG = " ".join(f"word{n}" for n in range(40))


@pytest.fixture(scope="module")
def sims() -> Iterator[list[Sim]]:
    started = [Sim("resp-a", "--itl-ms", "1"), Sim("resp-b", "--itl-ms", "1")]
    yield started
    stop_all(started)


@pytest.fixture(scope="module")
def fleet(sims: list[Sim]) -> Iterator[Fleet]:
    gateway = Gateway("--policy", "round_robin", "--route-receipt", workers=[s.url for s in sims])
    yield Fleet(sims, gateway)
    stop_all([gateway])


def sdk_for(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def sdk(fleet: Fleet) -> openai.OpenAI:
    return sdk_for(fleet.gateway)


def create(sdk: openai.OpenAI, **body: Any) -> tuple[Any, str, str]:
    """A whole response, the worker that made it and the route receipt's reason."""
    raw = sdk.responses.with_raw_response.create(model="sim-model", max_output_tokens=3, **body)
    return raw.parse(), raw.headers["x-worker-id"], reason(raw.headers["x-shunter-route"])


def reason(receipt: str) -> str:
    found = re.search(r"reason=(\w+)", receipt)
    assert found is not None, receipt
    return found.group(1)


def test_a_response_is_retrieved_listed_and_deleted_on_the_worker_that_made_it(
    sdk: openai.OpenAI,
) -> None:
    made, maker, _ = create(sdk, input="remember this for me")
    assert made.id.startswith("resp_") and len(made.output_text.split()) == 3
    for _ in range(3):  # round robin would alternate: every one goes to the maker
        raw = sdk.responses.with_raw_response.retrieve(made.id)
        assert raw.headers["x-worker-id"] == maker
        got = raw.parse()
        assert (got.id, got.output_text) == (made.id, made.output_text)
    items = sdk.responses.input_items.list(made.id).model_dump()["data"]
    assert [item["content"][0]["text"] for item in items] == ["remember this for me"]
    sdk.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError, match=made.id):  # the worker's own 404 now
        sdk.responses.retrieve(made.id)


def test_a_streamed_response_is_learnt_from_its_first_event(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.responses.create(model="sim-model", input="stream me", max_output_tokens=4, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    completed = events[-1].response  # type: ignore[union-attr]
    assert "".join(deltas) == completed.output_text and len(deltas) == 4
    makers = {
        sdk.responses.with_raw_response.retrieve(completed.id).headers["x-worker-id"]
        for _ in range(3)
    }
    assert len(makers) == 1
    assert sdk.responses.retrieve(completed.id).output_text == completed.output_text


def test_a_conversation_stays_on_the_worker_that_holds_it(sdk: openai.OpenAI) -> None:
    first, maker, _ = create(sdk, input=LONG, instructions="be brief")
    previous, cached = first.id, []
    for turn in range(3):
        reply, worker, why = create(
            sdk,
            input=f"and then {turn} {LONG}",
            instructions="be brief",  # instructions do not carry over: given each turn
            previous_response_id=previous,
        )
        assert (worker, why) == (maker, "previous_response")
        assert reply.previous_response_id == previous
        cached.append(reply.usage.input_tokens_details.cached_tokens)
        previous = reply.id
    # Each turn's prompt starts with the previous one's, which that worker cached.
    assert 0 < cached[0] < cached[1] < cached[2], cached
    # Without the conversation, round robin alternates.
    assert len({create(sdk, input=LONG)[1] for _ in range(2)}) == 2


def test_ids_the_gateway_does_not_know(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.retrieve("resp_never_seen")
    assert "resp_never_seen" in str(caught.value) and caught.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError, match="resp_never_seen"):
        sdk.responses.delete("resp_never_seen")
    with pytest.raises(openai.NotFoundError, match="resp_never_seen"):
        sdk.responses.input_items.list("resp_never_seen")
    # An unknown previous response is routed by the policy: the worker says it has none.
    with pytest.raises(openai.NotFoundError, match="resp_never_seen"):
        create(sdk, input="go on", previous_response_id="resp_never_seen")
    # Not stored by the worker: not remembered by the gateway either.
    unstored, _, _ = create(sdk, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.retrieve(unstored.id)
    assert caught.value.code == "response_not_found"


def test_a_removed_workers_conversation_falls_back_to_the_policy(
    sims: list[Sim], procs: list[Proc]
) -> None:
    gateway = Gateway("--policy", "round_robin", "--route-receipt", workers=[s.url for s in sims])
    procs.append(gateway)
    sdk = sdk_for(gateway)
    first, maker, _ = create(sdk, input=LONG)
    removed = next(s for s in sims if s.name == maker)
    survivor = next(s for s in sims if s.name != maker)
    with gateway.client() as http:
        assert http.delete("/workers/" + quote(removed.url, safe="")).status_code == 202
    wait_for(lambda: len(gateway.workers()) == 1, what="the worker removed")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.retrieve(first.id)
    assert caught.value.code == "response_worker_removed" and first.id in str(caught.value)
    # The next turn goes where the policy says: the survivor, which never held the
    # conversation (it was in the removed worker's memory) and says so, as it would alone.
    with gateway.client() as http:
        raw = http.post(
            "/v1/responses",
            json={"model": "sim-model", "input": "and then", "previous_response_id": first.id},
        )
    assert raw.headers["x-worker-id"] == survivor.name
    assert reason(raw.headers["x-shunter-route"]) == "round_robin"
    assert raw.status_code == 404 and first.id in raw.json()["error"]["message"]
    # A conversation started again there carries on there.
    again, worker, _ = create(sdk, input=LONG)
    follow, worker_next, why = create(sdk, input="more", previous_response_id=again.id)
    assert worker == worker_next == survivor.name and why == "previous_response"
    assert follow.output_text


def test_a_response_made_through_one_process_is_found_through_the_other(
    sims: list[Sim], procs: list[Proc]
) -> None:
    gateway = Gateway("--workers", "2", "--policy", "round_robin", workers=[s.url for s in sims])
    procs.append(gateway)

    def both_serving() -> bool:
        out = gateway.output()
        return all(
            re.search(
                rf"worker registered url={re.escape(s.url)} .*gateway_process={slot}$", out, re.M
            )
            for s in sims
            for slot in (0, 1)
        )

    wait_for(both_serving, what="both processes serving")
    made = sdk_for(gateway).responses.create(model="sim-model", input="shared", max_output_tokens=2)
    answered: set[int] = set()
    asked = iter(range(1000))

    def both_processes_found_it() -> bool:
        request_id = f"get-{next(asked)}-{made.id}"
        with httpx.Client(base_url=gateway.url, timeout=5) as http:  # a new connection each
            response = http.get(f"/v1/responses/{made.id}", headers={"x-request-id": request_id})
        if response.status_code == 200:  # the other process may not have heard of it yet
            assert response.json()["output"][0]["content"][0]["text"] == made.output_text
            answered.add(process_of(gateway, request_id))
        return answered == {0, 1}

    wait_for(both_processes_found_it, what="both processes answering")


def process_of(gateway: Gateway, request_id: str) -> int:
    """The slot whose access log has ``request_id``."""
    pattern = rf"request_id={re.escape(request_id)} .*gateway_process=(\d+)"
    wait_for(lambda: re.search(pattern, gateway.output()) is not None, what="the access line")
    found = re.search(pattern, gateway.output())
    assert found is not None
    return int(found.group(1))
