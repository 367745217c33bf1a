"""What joins a PD request's legs, read and checked; and the prefill's input logprobs."""

from __future__ import annotations

import pytest

from shunter.sim.logprobs import input_token_logprobs, token_id
from shunter.sim.pd_fields import (
    REMOTE_FIELDS,
    Bootstrap,
    PdFieldError,
    bootstrap_items,
    nixl_transfer_params,
    vllm_decode_params,
    vllm_prefill_params,
)

FIELDS = {"bootstrap_host": "10.0.0.1", "bootstrap_port": None, "bootstrap_room": 5}


def test_one_prompt_takes_scalars_and_a_batch_takes_arrays() -> None:
    assert bootstrap_items(FIELDS, "decode", None) == [Bootstrap("10.0.0.1", None, 5)]
    arrays = {"bootstrap_host": ["h", "h"], "bootstrap_port": [1, None], "bootstrap_room": [1, 2]}
    assert bootstrap_items(arrays, "decode", 2) == [Bootstrap("h", 1, 1), Bootstrap("h", None, 2)]
    with pytest.raises(PdFieldError, match="arrays of 3"):
        bootstrap_items(arrays, "decode", 3)
    with pytest.raises(PdFieldError, match="arrays of 2"):
        bootstrap_items(FIELDS, "prefill", 2)


def test_missing_or_malformed_fields_are_named() -> None:
    with pytest.raises(PdFieldError, match=r"prefill worker needs .* \(missing: bootstrap_room\)"):
        bootstrap_items({"bootstrap_host": "h", "bootstrap_port": 1}, "prefill", None)
    for bad, name in (
        ({"bootstrap_host": ""}, "bootstrap_host"),
        ({"bootstrap_port": 0}, "bootstrap_port"),
        ({"bootstrap_port": True}, "bootstrap_port"),
        ({"bootstrap_room": "5"}, "bootstrap_room"),
        ({"bootstrap_room": -1}, "bootstrap_room"),
    ):
        with pytest.raises(PdFieldError, match=name):
            bootstrap_items({**FIELDS, **bad}, "decode", None)


def test_vllm_legs_need_their_kv_transfer_params() -> None:
    vllm_prefill_params({"kv_transfer_params": {"do_remote_decode": True}})
    with pytest.raises(PdFieldError, match="do_remote_decode"):
        vllm_prefill_params({"kv_transfer_params": {"do_remote_decode": False}})
    answered = nixl_transfer_params("engine-a", "127.0.0.1", 9000, prompt_tokens=33, block_size=16)
    assert answered["remote_block_ids"] == [0, 1, 2] and set(REMOTE_FIELDS) <= set(answered)
    remote = vllm_decode_params({"kv_transfer_params": answered})
    assert (remote.host, remote.port) == ("127.0.0.1", 9000)
    assert remote.request_id == answered["remote_request_id"]
    partial = {k: v for k, v in answered.items() if k not in ("remote_port", "do_remote_prefill")}
    with pytest.raises(PdFieldError, match="do_remote_prefill: true, remote_port"):
        vllm_decode_params({"kv_transfer_params": partial})
    with pytest.raises(PdFieldError, match='needs "kv_transfer_params"'):
        vllm_decode_params({})


def test_input_logprobs_start_where_asked_and_stay_the_same() -> None:
    ids = [token_id(t) for t in ["7", "the", "river"]]
    assert ids[0] == 7  # input_ids keep their own numbers
    whole = input_token_logprobs(ids, 0)
    assert [entry[1] for entry in whole] == ids and all(entry[0] < 0 for entry in whole)
    assert input_token_logprobs(ids, 1) == whole[1:]
    assert input_token_logprobs(ids, -1) == whole[-1:]  # SGLang: the last prompt token
    assert input_token_logprobs(ids, 0) == whole
