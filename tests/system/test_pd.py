"""Prefill/decode disaggregation through a real gateway, with sims playing each leg.

The sims check the pairing as engines do: a decode waits for its room at the prefill named
in its request and gives up after the bootstrap timeout (here 5 s), so a pairing the gateway
broke, or a leg it failed to cancel, shows as a slow or failed request and in the sims'
``/sim/requests`` records (role, rooms, aborted).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from support.harness import LOOPBACK, Gateway, GrpcSim, Proc, Sim, free_port, wait_for

BOOTSTRAP_TIMEOUT = "5"


_ids = itertools.count()


class PdFleet:
    def __init__(self, prefills: list[Sim], decodes: list[Sim], gateway: Gateway) -> None:
        self.prefills = prefills
        self.decodes = decodes
        self.gateway = gateway
        self.request_id = ""  # the last request's (both legs carry it)

    def post(self, path: str, body: dict[str, Any], timeout: float = 15) -> httpx.Response:
        self.request_id = f"pd-test-{next(_ids)}"
        headers = {"x-request-id": self.request_id}
        return httpx.post(self.gateway.url + path, json=body, headers=headers, timeout=timeout)

    def legs(self, request_id: str | None = None) -> tuple[list[Any], list[Any]]:
        """The prefill and the decode records of a request (default: the last one sent)."""
        wanted = [request_id or self.request_id]
        return tuple(  # type: ignore[return-value]
            [
                r
                for sim in sims
                for r in sim.requests()
                if r["headers"].get("x-request-id") == wanted
            ]
            for sims in (self.prefills, self.decodes)
        )

    def pair(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The one prefill and one decode record of the last request."""
        (prefill,), (decode,) = self.legs()
        return prefill, decode


def prefill_sim(name: str, *extra: str, kind: type[Sim] = Sim) -> tuple[Sim, int]:
    """A prefill sim (``kind``: ``GrpcSim`` for gRPC) and its bootstrap port."""
    port = free_port()
    bootstrap = ["--disaggregation-bootstrap-port", str(port)]
    return kind(name, "--disaggregation-mode", "prefill", *bootstrap, *_timeout(extra)), port


def decode_sim(name: str, *extra: str, kind: type[Sim] = Sim) -> Sim:
    return kind(name, "--disaggregation-mode", "decode", *_timeout(extra))


def _timeout(extra: tuple[str, ...]) -> list[str]:
    return ["--disaggregation-bootstrap-timeout", BOOTSTRAP_TIMEOUT, *extra]


def pd_gateway(prefills: list[tuple[Sim, int]], decodes: list[Sim], *extra: str) -> Gateway:
    args: list[str] = ["--pd-disaggregation", "--policy", "round_robin", *extra]
    for sim, port in prefills:
        args += ["--prefill", sim.url, str(port)]
    for sim in decodes:
        args += ["--decode", sim.url]
    gateway = Gateway(*args)
    gateway.wait_workers(len(prefills) + len(decodes))
    return gateway


@pytest.fixture(scope="module")
def sglang() -> Iterator[PdFleet]:
    """Two SGLang prefill sims and two decode sims behind a PD gateway."""
    prefills = [prefill_sim("prefill-a"), prefill_sim("prefill-b")]
    decodes = [decode_sim("decode-a"), decode_sim("decode-b")]
    gateway = pd_gateway(prefills, decodes, "--retry-initial-backoff-ms", "1")
    yield PdFleet([s for s, _ in prefills], decodes, gateway)
    gateway.stop()
    for sim in [*(s for s, _ in prefills), *decodes]:
        sim.stop()


def sse_events(text: str) -> list[Any]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", text
    return [orjson.loads(d) for d in data[:-1]]


def test_each_request_is_served_by_a_pair_sharing_its_rooms(sglang: PdFleet) -> None:
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
    for path, body in (
        ("/generate", {"text": "hello there", "sampling_params": {"max_new_tokens": 4}}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/completions", {"prompt": "hello there", "max_tokens": 4}),
    ):
        answer = sglang.post(path, body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-worker-id"].startswith("decode-")  # the decode answered
        if body.get("stream"):
            assert sse_events(answer.text)
        prefill, decode = sglang.pair()
        assert (prefill["role"], decode["role"]) == ("prefill", "decode")
        assert prefill["rooms"] == decode["rooms"] and len(decode["rooms"]) == 1
        assert not prefill["aborted"] and not decode["aborted"]


def test_a_batch_gets_a_room_per_sequence(sglang: PdFleet) -> None:
    answer = sglang.post("/generate", {"text": ["one", "two", "three"]})
    assert answer.status_code == 200 and len(answer.json()) == 3
    prefill, decode = sglang.pair()
    assert prefill["rooms"] == decode["rooms"] and len(set(decode["rooms"])) == 3
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 2}
    answer = sglang.post("/v1/chat/completions", chat)
    assert answer.status_code == 200 and [c["index"] for c in answer.json()["choices"]] == [0, 1]


def test_input_logprobs_are_the_prefills_whole_and_streamed(sglang: PdFleet) -> None:
    body = {"text": "the prompt has six words", "return_logprob": True, "logprob_start_len": 0}
    whole = sglang.post("/generate", body).json()
    logprobs = whole["meta_info"]["input_token_logprobs"]
    assert len(logprobs) == whole["meta_info"]["prompt_tokens"] and all(
        lp[0] < 0 for lp in logprobs
    )
    streamed = sglang.post("/generate", {**body, "stream": True})
    events = sse_events(streamed.text)
    assert len(events) > 1
    for event in events:
        assert event["meta_info"]["input_token_logprobs"] == logprobs


def test_a_refused_prefill_ends_the_request_at_once_and_cancels_the_decode(
    sglang: PdFleet,
) -> None:
    for sim in sglang.prefills:
        sim.set_faults(error_rate=1.0, error_status=400)
    try:
        started = time.perf_counter()
        answer = sglang.post("/v1/completions", {"prompt": "too long a prompt"})
        waited = time.perf_counter() - started
    finally:
        for sim in sglang.prefills:
            sim.set_faults(error_rate=0.0, error_status=500)
    assert answer.status_code == 400 and waited < 1.0  # not the decode's 5 s bootstrap timeout
    assert answer.json()["error"]["code"] == "prefill_bad_request"
    assert "prefill worker answered 400" in answer.json()["error"]["message"]

    request_id = sglang.request_id

    def decode_aborted() -> bool:
        _, decodes = sglang.legs(request_id)
        return len(decodes) == 1 and decodes[0]["aborted"]

    wait_for(decode_aborted, 5, "the decode leg cancelled")


def test_a_failing_prefill_is_retried_on_a_new_pair_with_new_rooms(sglang: PdFleet) -> None:
    failing = sglang.prefills[0]
    failing.set_faults(error_rate=1.0, error_status=503)
    try:
        ids = []
        for _ in range(2):  # one of them starts on the failing prefill (round robin)
            answer = sglang.post("/v1/completions", {"prompt": "retry me", "max_tokens": 2})
            assert answer.status_code == 200, answer.text
            ids.append(sglang.request_id)
    finally:
        failing.set_faults(error_rate=0.0, error_status=500)
    # Each leg's round robin moves on per selection, a retry's included: which requests
    # meet the failing prefill depends on where it stood, but at least one does.
    retried = [i for i in ids if len(sglang.legs(i)[0]) == 2]
    assert retried, "a request met the failing prefill and was retried"
    for request_id in retried:

        def one_decode_aborted(request_id: str = request_id) -> bool:  # noticed a bit later
            return sum(bool(r["aborted"]) for r in sglang.legs(request_id)[1]) == 1

        wait_for(one_decode_aborted, 5, "the failed pair's decode cancelled")
        prefills, decodes = sglang.legs(request_id)
        first, second = sorted(decodes, key=lambda r: not r["aborted"])
        assert first["aborted"] and not second["aborted"]  # the failed pair's decode cancelled
        assert not set(first["rooms"]) & set(second["rooms"])  # the new pair got new rooms
        sent = {orjson.loads(r["body"])["bootstrap_room"] for r in prefills}
        assert sent == {first["rooms"][0], second["rooms"][0]}  # a fault reads no rooms


def test_a_client_that_leaves_cancels_both_legs(sglang: PdFleet) -> None:
    for sim in sglang.prefills:
        sim.set_faults(extra_latency_ms=3000.0)  # the prefill is still working when it leaves
    try:
        body = orjson.dumps({"prompt": "going away", "stream": True})
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {LOOPBACK}\r\nx-request-id: leaving\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((LOOPBACK, sglang.gateway.port)) as client:
            client.sendall(head.encode() + body)
            wait_for(lambda: _both_waiting(sglang), 5, "both legs in flight")
        wait_for(lambda: _both_aborted(sglang), 5, "both legs cancelled")
        assert not _both_waiting(sglang)
    finally:
        for sim in sglang.prefills:
            sim.set_faults(extra_latency_ms=0.0)


def _both_waiting(fleet: PdFleet) -> bool:
    workers = httpx.get(fleet.gateway.url + "/workers", timeout=5).json()["workers"]
    loads = {w["worker_type"]: w["load"] for w in workers if w["load"]}
    return set(loads) == {"prefill", "decode"}


def _both_aborted(fleet: PdFleet) -> bool:
    prefills, decodes = fleet.legs("leaving")
    return len(prefills) == len(decodes) == 1 and prefills[0]["aborted"] and decodes[0]["aborted"]


def test_readiness_follows_the_legs_as_workers_come_and_go(sglang: PdFleet) -> None:
    gateway = sglang.gateway
    ready = httpx.get(gateway.url + "/readiness", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["healthy_prefill_workers"] == 2
    assert ready.json()["healthy_decode_workers"] == 2
    decodes = [d.url for d in sglang.decodes]
    try:
        for url in decodes:
            removed = httpx.delete(f"{gateway.url}/workers/{url.replace(':', '%3A')}", timeout=5)
            assert removed.status_code == 202
        not_ready = httpx.get(gateway.url + "/readiness", timeout=5)
        assert not_ready.status_code == 503
        assert not_ready.json()["reason"] == "no healthy decode worker"
        refused = sglang.post("/v1/completions", {"prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_decode_workers"
    finally:
        for url in decodes:
            added = httpx.post(
                gateway.url + "/workers", json={"url": url, "worker_type": "decode"}, timeout=5
            )
            assert added.status_code == 202
        gateway.wait_workers(4)
    assert httpx.get(gateway.url + "/readiness", timeout=5).status_code == 200
    assert sglang.post("/v1/completions", {"prompt": "back", "max_tokens": 2}).status_code == 200
    check = httpx.get(gateway.url + "/health_generate", timeout=10)
    assert check.status_code == 200 and check.json()["decode"] in decodes


def test_pd_metrics(sglang: PdFleet) -> None:
    text = httpx.get(sglang.gateway.metrics_url, timeout=5).text
    assert 'smg_pd_requests_total{endpoint="/v1/completions",model="sim-model"}' in text
    assert "smg_pd_ttft_seconds_count" in text
    assert "smg_pd_prefill_duration_seconds_count" in text
    assert (
        'smg_pd_bootstrap_failures_total{leg="prefill",model="sim-model",reason="status_400"}'
        in text
    )


def test_grpc_pairs_share_a_room_through_disaggregated_params(procs: list[Proc]) -> None:
    pytest.importorskip("grpc")
    prefill, port = prefill_sim("grpc-prefill", kind=GrpcSim)
    procs.append(prefill)
    decode = decode_sim("grpc-decode", kind=GrpcSim)
    procs.append(decode)
    gateway = pd_gateway([(prefill, port)], [decode])
    procs.append(gateway)
    fleet = PdFleet([prefill], [decode], gateway)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = fleet.post("/v1/chat/completions", chat)
    assert answer.status_code == 200, answer.text
    streamed = fleet.post("/v1/chat/completions", {**chat, "stream": True})
    assert streamed.status_code == 200 and sse_events(streamed.text)
    p, d = fleet.pair()
    assert p["rooms"] == d["rooms"] and 0 <= p["rooms"][0] < 2**31
    # The prefill refuses after 300 ms: by then the decode is at its worker, waiting for the
    # room (a refusal at once can cancel the decode call before it is sent at all).
    prefill.set_faults(error_rate=1.0, error_status=400, extra_latency_ms=300)
    started = time.perf_counter()
    refused = fleet.post("/v1/chat/completions", chat)
    assert refused.status_code == 400 and time.perf_counter() - started < 1.3
    wait_for(lambda: fleet.pair()[1]["aborted"], 5, "the gRPC decode aborted")


def test_vllm_pairs_hand_over_kv_transfer_params_and_short_prompts_skip_the_prefill(
    procs: list[Proc],
) -> None:
    prefill, port = prefill_sim("vllm-prefill", "--runtime", "vllm")
    procs.append(prefill)
    decode = decode_sim("vllm-decode", "--runtime", "vllm")
    procs.append(decode)
    gateway = pd_gateway([(prefill, port)], [decode], "--pd-min-prefill-tokens", "16")
    procs.append(gateway)
    fleet = PdFleet([prefill], [decode], gateway)
    long_prompt = " ".join(f"word{i}" for i in range(40))  # ~60 tokens by the 4-chars rule
    answer = fleet.post("/v1/completions", {"prompt": long_prompt, "max_tokens": 3, "stream": True})
    assert answer.status_code == 200 and sse_events(answer.text)
    p, d = fleet.pair()
    assert p["rooms"] == d["rooms"] and p["rooms"][0].startswith("xfer-")
    short = fleet.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    prefills, (alone,) = fleet.legs()
    assert prefills == [] and alone["rooms"] == []  # the decode ran it alone


def test_both_legs_receive_only_the_allowed_headers(sglang: PdFleet) -> None:
    sglang.request_id = f"pd-test-{next(_ids)}"
    headers = {
        "x-request-id": sglang.request_id,
        "cookie": "session=secret",
        "x-api-key": "sk-other-service",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    body = {"text": "hello there", "sampling_params": {"max_new_tokens": 4}}
    answer = httpx.post(sglang.gateway.url + "/generate", json=body, headers=headers, timeout=15)
    assert answer.status_code == 200, answer.text
    for leg in sglang.pair():
        assert "traceparent" in leg["headers"]
        assert not {"cookie", "x-api-key"} & leg["headers"].keys()
