"""`shunter sim --disaggregation-mode prefill|decode`: the sim plays PD legs as SGLang's and
vLLM's engines do, so that a pairing the gateway breaks fails here as it would on a fleet.

The sims are driven directly (no gateway): a test sends each leg itself, as the gateway will.
Bootstrap timeouts are short (0.5-1 s) so the unpaired cases stay quick.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from support.harness import LOOPBACK, GrpcSim, Sim, free_port, wait_for

TIMEOUT = 1.0  # the pairs' bootstrap timeout, seconds
_rooms = itertools.count(1000)


def fresh_room() -> int:
    return next(_rooms)


def start_together(*starts: Callable[[], Sim]) -> list[Sim]:
    """Start sims at once (each waits for its own readiness); stop them all if one fails."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
    started = [f.result() for f in futures if f.exception() is None]
    failures = [error for f in futures if (error := f.exception()) is not None]
    if failures:
        for sim in started:
            sim.stop()
        raise failures[0]
    return started


class Pair:
    def __init__(self, prefill: Sim, decode: Sim, bootstrap_port: int) -> None:
        self.prefill = prefill
        self.decode = decode
        self.bootstrap_port = bootstrap_port

    def fields(self, room: int, port: int | None = None) -> dict[str, Any]:
        """What the gateway adds to both legs' bodies (port None: the decode's own)."""
        return {"bootstrap_host": LOOPBACK, "bootstrap_port": port, "bootstrap_room": room}

    def send_both(self, path: str, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
        """Both legs at once, as the gateway sends them: (prefill, decode)."""
        with ThreadPoolExecutor(2) as pool:
            prefill = pool.submit(post, self.prefill.url + path, body)
            decode = pool.submit(post, self.decode.url + path, body)
            return prefill.result(), decode.result()


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=10)


def rooms_waiting(sim: Sim) -> int:
    return int(sim.stats()["bootstrap_rooms"])


def raw_post(path: str, body: bytes) -> bytes:
    """A request for a plain socket, whose closing is the client leaving."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def sse_events(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    return [orjson.loads(e) for e in events[:-1]]


@pytest.fixture(scope="module")
def sglang() -> Iterator[Pair]:
    """An SGLang prefill and decode; the decode's own bootstrap port is the prefill's, so a
    null bootstrap_port reaches the prefill (SGLang's default-port case)."""
    port = free_port()
    timeout = ["--disaggregation-bootstrap-timeout", str(TIMEOUT)]
    bootstrap = ["--disaggregation-bootstrap-port", str(port)]
    prefill, decode = start_together(
        lambda: Sim("prefill", "--disaggregation-mode", "prefill", *bootstrap, *timeout),
        lambda: Sim("decode", "--disaggregation-mode", "decode", *bootstrap, *timeout),
    )
    yield Pair(prefill, decode, port)
    prefill.stop()
    decode.stop()


def test_server_info_reports_the_pd_mode_and_bootstrap_port(sglang: Pair) -> None:
    info = httpx.get(sglang.prefill.url + "/server_info").json()
    assert info["disaggregation_mode"] == "prefill"
    assert info["disaggregation_bootstrap_port"] == sglang.bootstrap_port
    assert httpx.get(sglang.decode.url + "/server_info").json()["disaggregation_mode"] == "decode"


def test_legs_without_bootstrap_fields_are_refused(sglang: Pair) -> None:
    for sim, role in ((sglang.prefill, "prefill"), (sglang.decode, "decode")):
        refused = post(sim.url + "/generate", {"text": "hello there"})
        assert refused.status_code == 400
        message = refused.json()["error"]["message"]
        assert f"{role} worker needs bootstrap_host, bootstrap_port and bootstrap_room" in message
    # n > 1 needs one room per choice
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2, **sglang.fields(1)}
    refused = post(sglang.prefill.url + "/v1/chat/completions", chat)
    assert refused.status_code == 400 and "arrays of 2" in refused.json()["error"]["message"]
    # faults come first: a prefill told to fail answers at once and publishes nothing
    sglang.prefill.set_faults(error_rate=1.0, error_status=400)
    try:
        body = {"text": "hello", **sglang.fields(fresh_room(), sglang.bootstrap_port)}
        failed = post(sglang.prefill.url + "/generate", body)
    finally:
        sglang.prefill.set_faults(error_rate=0.0, error_status=500)
    assert failed.status_code == 400 and "injected fault" in failed.text
    assert rooms_waiting(sglang.prefill) == 0


def test_the_prefill_answers_only_once_its_decode_claimed_the_room(sglang: Pair) -> None:
    room = fresh_room()
    body = {"text": "the prompt of a pair", "sampling_params": {"max_new_tokens": 5}}
    body |= sglang.fields(room, port=None)  # null: the decode asks its own bootstrap port
    answered: list[httpx.Response] = []
    prefill = threading.Thread(
        target=lambda: answered.append(post(sglang.prefill.url + "/generate", body))
    )
    prefill.start()
    wait_for(lambda: rooms_waiting(sglang.prefill) == 1, what="the room published")
    assert prefill.is_alive() and not answered  # held: its decode has not come yet
    decode = post(sglang.decode.url + "/generate", body)
    prefill.join(10)
    assert decode.status_code == 200, decode.text
    assert decode.json()["meta_info"]["completion_tokens"] == 5
    assert answered[0].status_code == 200, answered[0].text
    one = answered[0].json()
    assert one["meta_info"]["completion_tokens"] == 1 and len(one["text"].split()) == 1
    assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
    assert rooms_waiting(sglang.prefill) == 0
    prefill_record, decode_record = sglang.prefill.requests()[-1], sglang.decode.requests()[-1]
    assert (prefill_record["role"], prefill_record["rooms"]) == ("prefill", [room])
    assert (decode_record["role"], decode_record["rooms"]) == ("decode", [room])
    assert decode_record["aborted"] is False and decode_record["bootstrap_wait_ms"] >= 0


def test_unpaired_legs_fail_after_the_bootstrap_timeout(sglang: Pair) -> None:
    """A prefill whose decode never comes, and a decode whose room never appears (streamed:
    the failure comes before the stream starts)."""
    alone, missing = fresh_room(), fresh_room()
    prefill_body = {"text": "nobody decodes this", **sglang.fields(alone, sglang.bootstrap_port)}
    decode_body = {"text": "x", "stream": True, **sglang.fields(missing, sglang.bootstrap_port)}
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        prefill = pool.submit(post, sglang.prefill.url + "/generate", prefill_body)
        decode = pool.submit(post, sglang.decode.url + "/generate", decode_body)
        prefill_answer, decode_answer = prefill.result(), decode.result()
    assert time.monotonic() - started >= TIMEOUT
    assert prefill_answer.status_code == 500
    assert prefill_answer.json()["error"]["message"] == (
        f"bootstrap timed out: room {alone} was never claimed"
    )
    assert decode_answer.status_code == 500
    assert decode_answer.headers["content-type"] == "application/json"
    assert decode_answer.json()["error"]["message"] == (
        f"bootstrap timed out waiting for room {missing} at {LOOPBACK}:{sglang.bootstrap_port}"
    )
    assert rooms_waiting(sglang.prefill) == 0  # forgotten


def test_a_decode_whose_client_leaves_stops_waiting(sglang: Pair) -> None:
    room = fresh_room()
    body = orjson.dumps({"text": "left", **sglang.fields(room, sglang.bootstrap_port)})
    aborted = sglang.decode.stats()["aborted_total"]
    with socket.create_connection((LOOPBACK, sglang.decode.port)) as client:
        client.sendall(raw_post("/generate", body))
        wait_for(lambda: sglang.decode.requests()[-1]["rooms"] == [room], what="decode waiting")
    wait_for(lambda: sglang.decode.requests()[-1]["aborted"], what="the decode recorded aborted")
    assert sglang.decode.stats()["aborted_total"] == aborted + 1
    # It stopped polling: a prefill publishing that room now finds no decode.
    prefill_body = {"text": "left", **sglang.fields(room, sglang.bootstrap_port)}
    late = post(sglang.prefill.url + "/generate", prefill_body)
    assert late.status_code == 500 and "was never claimed" in late.text


def test_a_prefill_whose_client_leaves_forgets_its_room_at_once(sglang: Pair) -> None:
    """The gateway cancelling a prefill leg: the room goes now, not at the timeout."""
    body = orjson.dumps({"text": "cancelled", **sglang.fields(fresh_room(), None)})
    aborted = sglang.prefill.stats()["aborted_total"]
    with socket.create_connection((LOOPBACK, sglang.prefill.port)) as client:
        client.sendall(raw_post("/generate", body))
        wait_for(lambda: rooms_waiting(sglang.prefill) == 1, what="the room published")
        left = time.monotonic()
    wait_for(lambda: sglang.prefill.requests()[-1]["aborted"], what="the prefill aborted")
    assert rooms_waiting(sglang.prefill) == 0
    assert time.monotonic() - left < TIMEOUT  # so it was not the timeout that removed it
    assert sglang.prefill.stats()["aborted_total"] == aborted + 1


def test_a_batch_carries_one_room_per_item(sglang: Pair) -> None:
    rooms = [fresh_room(), fresh_room()]
    body = {
        "text": ["first prompt of the batch", "second prompt"],
        "sampling_params": {"max_new_tokens": 3},
        "stream": True,
        "bootstrap_host": [LOOPBACK, LOOPBACK],
        "bootstrap_port": [sglang.bootstrap_port, None],
        "bootstrap_room": rooms,
    }
    prefill, decode = sglang.send_both("/generate", body)
    assert (prefill.status_code, decode.status_code) == (200, 200), (prefill.text, decode.text)
    prefill_events, decode_events = sse_events(prefill.text), sse_events(decode.text)
    assert sorted(e["index"] for e in prefill_events) == [0, 1]  # one token each
    finals = {e["index"]: e["meta_info"] for e in decode_events if e["meta_info"]["finish_reason"]}
    assert {i: m["completion_tokens"] for i, m in finals.items()} == {0: 3, 1: 3}
    assert sglang.decode.requests()[-1]["rooms"] == rooms
    # whole, with a list of input_ids lists: a list of answers
    whole = {**body, "stream": False, "bootstrap_room": [fresh_room(), fresh_room()]}
    del whole["text"]
    whole["input_ids"] = [[1, 2, 3], [4, 5]]
    prefill, decode = sglang.send_both("/generate", whole)
    assert [a["meta_info"]["prompt_tokens"] for a in prefill.json()] == [3, 2]
    assert [a["meta_info"]["completion_tokens"] for a in decode.json()] == [3, 3]
    short = {**whole, "bootstrap_room": [fresh_room()]}  # one room for two items
    refused = post(sglang.decode.url + "/generate", short)
    assert refused.status_code == 400 and "arrays of 2" in refused.json()["error"]["message"]


def test_chat_n_and_completion_lists_answer_one_choice_per_room(sglang: Pair) -> None:
    body = {
        "messages": [{"role": "user", "content": "two answers please"}],
        "n": 2,
        "max_tokens": 4,
        "bootstrap_host": [LOOPBACK, LOOPBACK],
        "bootstrap_port": [None, None],
        "bootstrap_room": [fresh_room(), fresh_room()],
    }
    prefill, decode = sglang.send_both("/v1/chat/completions", body)
    assert (prefill.status_code, decode.status_code) == (200, 200), (prefill.text, decode.text)
    assert [c["index"] for c in decode.json()["choices"]] == [0, 1]
    assert decode.json()["usage"]["completion_tokens"] == 8
    assert prefill.json()["usage"]["completion_tokens"] == 2
    completion = {
        "prompt": ["one prompt", "another prompt"],
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        **{k: v for k, v in body.items() if k.startswith("bootstrap_")},
        "bootstrap_room": [fresh_room(), fresh_room()],
    }
    prefill, decode = sglang.send_both("/v1/completions", completion)
    events = sse_events(decode.text)
    assert {e["choices"][0]["index"] for e in events if e["choices"]} == {0, 1}
    assert len({e["id"] for e in events}) == 1  # one response
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert sse_events(prefill.text)[-1]["usage"]["completion_tokens"] == 2


def test_input_logprobs_come_from_the_prefill_only(sglang: Pair) -> None:
    ids = [11, 12, 13, 14, 15]
    body = {
        "input_ids": ids,
        "return_logprob": True,
        "logprob_start_len": 2,
        "sampling_params": {"max_new_tokens": 3},
        **sglang.fields(fresh_room(), sglang.bootstrap_port),
    }
    prefill, decode = sglang.send_both("/generate", body)
    logprobs = prefill.json()["meta_info"]["input_token_logprobs"]
    assert [entry[1] for entry in logprobs] == ids[2:]
    assert all(entry[0] < 0 and entry[2] is None for entry in logprobs)
    assert decode.json()["meta_info"]["input_token_logprobs"] == []
    again, _ = sglang.send_both("/generate", {**body, "bootstrap_room": fresh_room()})
    assert again.json()["meta_info"]["input_token_logprobs"] == logprobs  # deterministic
    streamed = {**body, "stream": True, "bootstrap_room": fresh_room()}
    prefill, decode = sglang.send_both("/generate", streamed)
    (only,) = sse_events(prefill.text)  # the prefill streams its one token
    assert only["meta_info"]["input_token_logprobs"] == logprobs
    events = sse_events(decode.text)
    assert len(events) == 3
    assert all(e["meta_info"]["input_token_logprobs"] == [] for e in events)


# --- vLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm() -> Iterator[Pair]:
    port = free_port()
    prefill, decode = start_together(
        lambda: Sim(
            "vllm-prefill",
            "--runtime",
            "vllm",
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(port),
            "--disaggregation-bootstrap-timeout",
            str(TIMEOUT),
        ),
        lambda: Sim(
            "vllm-decode",
            "--runtime",
            "vllm",
            "--disaggregation-mode",
            "decode",
            "--disaggregation-bootstrap-timeout",
            "0.5",
        ),
    )
    yield Pair(prefill, decode, port)
    prefill.stop()
    decode.stop()


CHAT = [{"role": "user", "content": "a question for two engines"}]


def test_vllm_prefill_hands_its_kv_transfer_params_to_the_decode(vllm: Pair) -> None:
    leg = {"messages": CHAT, "max_tokens": 1, "stream": False}
    prefill = post(
        vllm.prefill.url + "/v1/chat/completions",
        {**leg, "kv_transfer_params": {"do_remote_decode": True}},
    )
    assert prefill.status_code == 200, prefill.text
    params = prefill.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_host"], params["remote_port"]) == (LOOPBACK, vllm.bootstrap_port)
    assert params["remote_engine_id"] == "vllm-prefill" and params["tp_size"] == 1
    assert params["remote_block_ids"] and all(
        isinstance(b, int) for b in params["remote_block_ids"]
    )
    assert prefill.json()["usage"]["completion_tokens"] == 1
    assert rooms_waiting(vllm.prefill) == 1  # answered at once; the transfer waits
    decode_body = {"messages": CHAT, "max_tokens": 4, "stream": True, "kv_transfer_params": params}
    decode = post(vllm.decode.url + "/v1/chat/completions", decode_body)
    assert decode.status_code == 200, decode.text
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(decode.text))
    assert len(content.split()) == 4
    assert rooms_waiting(vllm.prefill) == 0
    assert vllm.decode.requests()[-1]["rooms"] == [params["remote_request_id"]]
    # the legs refuse what is not a PD leg of theirs
    refused = post(vllm.prefill.url + "/v1/chat/completions", leg)
    assert refused.status_code == 400 and "do_remote_decode" in refused.text
    two = {**leg, "max_tokens": 5, "kv_transfer_params": {"do_remote_decode": True}}
    assert post(vllm.prefill.url + "/v1/chat/completions", two).status_code == 400
    partial = {"do_remote_prefill": True, "remote_host": LOOPBACK}
    refused = post(
        vllm.decode.url + "/v1/completions", {"prompt": "x", "kv_transfer_params": partial}
    )
    assert refused.status_code == 400 and "remote_request_id" in refused.text
    # No kv_transfer_params at all: a kv_both decode serves the request whole.
    alone = post(vllm.decode.url + "/v1/completions", {"prompt": "x y z", "max_tokens": 3})
    assert alone.status_code == 200 and alone.json()["usage"]["completion_tokens"] == 3
    assert vllm.decode.requests()[-1]["rooms"] == []


def test_vllm_decode_with_an_unknown_transfer_times_out(vllm: Pair) -> None:
    params = {
        "do_remote_prefill": True,
        "remote_engine_id": "vllm-prefill",
        "remote_block_ids": [0],
        "remote_host": LOOPBACK,
        "remote_port": vllm.bootstrap_port,
        "remote_request_id": "xfer-never-made",
    }
    started = time.monotonic()
    failed = post(
        vllm.decode.url + "/v1/completions", {"prompt": "x", "kv_transfer_params": params}
    )
    assert time.monotonic() - started >= 0.5
    assert failed.status_code == 500
    assert "bootstrap timed out waiting for room xfer-never-made" in failed.text


def test_the_vllm_runtime_looks_like_vllm(vllm: Pair) -> None:
    sim = vllm.prefill
    assert httpx.get(sim.url + "/v1/models").json()["data"][0]["owned_by"] == "vllm"
    metrics = httpx.get(sim.url + "/metrics").text
    assert "vllm:num_requests_running{" in metrics and "vllm:num_requests_waiting{" in metrics
    assert httpx.post(sim.url + "/generate", json={"text": "x"}).status_code == 404
    assert httpx.get(sim.url + "/server_info").status_code == 404
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(64))}]
    body = {"messages": long, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}

    def cached() -> int:
        reply = post(sim.url + "/v1/chat/completions", body).json()
        return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])

    cached()
    assert cached() > 0
    assert httpx.post(sim.url + "/reset_prefix_cache").status_code == 200
    assert cached() == 0


# --- gRPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_pair() -> Iterator[Pair]:
    pytest.importorskip("smg_grpc_proto")
    port = free_port()
    timeout = ["--disaggregation-bootstrap-timeout", str(TIMEOUT)]
    prefill, decode = start_together(
        lambda: GrpcSim(
            "grpc-prefill",
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(port),
            *timeout,
        ),
        lambda: GrpcSim("grpc-decode", "--disaggregation-mode", "decode", *timeout),
    )
    yield Pair(prefill, decode, port)
    prefill.stop()
    decode.stop()


def generate_request(room: int | None, port: int, **fields: Any) -> Any:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    pd = {}
    if room is not None:
        params = pb.DisaggregatedParams(
            bootstrap_host=LOOPBACK, bootstrap_port=port, bootstrap_room=room
        )
        pd = {"disaggregated_params": params}
    return pb.GenerateRequest(
        request_id=f"req-{fresh_room()}",
        tokenized=pb.TokenizedInput(input_ids=[5, 6, 7, 8]),
        sampling_params=pb.SamplingParams(max_new_tokens=4),
        **pd,
        **fields,
    )


async def grpc_generate(sim: Sim, request: Any) -> list[Any]:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc

    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{sim.port}") as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        return [response async for response in stub.Generate(request)]


async def test_grpc_legs_join_through_disaggregated_params(grpc_pair: Pair) -> None:
    import grpc

    room = fresh_room()
    request = generate_request(room, grpc_pair.bootstrap_port, return_logprob=True)
    prefill, decode = await asyncio.gather(
        grpc_generate(grpc_pair.prefill, request), grpc_generate(grpc_pair.decode, request)
    )
    (answer,) = prefill
    assert len(answer.complete.output_ids) == 1 and answer.complete.completion_tokens == 1
    assert list(answer.complete.input_logprobs.token_ids) == [5, 6, 7, 8]
    assert all(v.value < 0 for v in answer.complete.input_logprobs.token_logprobs)
    assert decode[-1].complete.completion_tokens == 4
    assert not decode[-1].complete.HasField("input_logprobs")
    for sim, role in ((grpc_pair.prefill, "prefill"), (grpc_pair.decode, "decode")):
        record = sim.requests()[-1]
        assert (record["role"], record["rooms"], record["aborted"]) == (role, [room], False)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await grpc_generate(grpc_pair.prefill, generate_request(None, 0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_decode_without_its_prefill_fails_with_internal(grpc_pair: Pair) -> None:
    import grpc

    missing = fresh_room()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_generate(grpc_pair.decode, generate_request(missing, grpc_pair.bootstrap_port))
    assert time.monotonic() - started >= TIMEOUT
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert f"waiting for room {missing}" in (failed.value.details() or "")


async def test_a_grpc_decode_cancelled_or_aborted_while_waiting_is_recorded_aborted(
    grpc_pair: Pair,
) -> None:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc

    decode = grpc_pair.decode

    def waiting(room: int) -> None:
        wait_for(lambda: decode.requests()[-1]["rooms"] == [room], what="decode waiting")

    aborted = decode.stats()["aborted_total"]
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{decode.port}") as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        left = fresh_room()  # the client goes
        call = stub.Generate(generate_request(left, grpc_pair.bootstrap_port))
        await asyncio.to_thread(waiting, left)
        call.cancel()
        await asyncio.to_thread(
            wait_for, lambda: decode.requests()[-1]["aborted"], what="a cancelled call aborted"
        )
        stopped = fresh_room()  # the gateway's Abort
        request = generate_request(stopped, grpc_pair.bootstrap_port)
        call = stub.Generate(request)
        await asyncio.to_thread(waiting, stopped)
        await stub.Abort(pb.AbortRequest(request_id=request.request_id))
        answers = [response async for response in call]
    assert answers[-1].complete.finish_reason == "abort"
    assert decode.requests()[-1]["aborted"] is True
    assert decode.stats()["aborted_total"] == aborted + 2
