"""SGLang's bootstrap fields: how many rooms a request needs, and how they go in its body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shunter.protocols.bootstrap import Bootstrap, bootstrap_host, new_rooms, sequences
from shunter.protocols.routing import decode_routing_fields


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/generate", {"text": "a"}, (1, False)),
        ("/generate", {"text": ["a", "b", "c"]}, (3, True)),
        ("/generate", {"text": ["a"]}, (1, True)),  # a batch of one is still a batch
        ("/generate", {"input_ids": [1, 2, 3]}, (1, False)),  # one tokenized prompt
        ("/generate", {"input_ids": [[1, 2], [3]]}, (2, True)),
        ("/generate", {"text": "a", "sampling_params": {"n": 3}}, (3, True)),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 2}]}, (4, True)),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, (1, False)),
        ("/v1/chat/completions", {"messages": [], "n": 4}, (4, True)),
        ("/v1/chat/completions", {"messages": [], "n": True}, (1, False)),  # the worker's to refuse
        ("/v1/completions", {"prompt": "x"}, (1, False)),
        ("/v1/completions", {"prompt": ["x", "y"]}, (2, True)),
        ("/v1/completions", {"prompt": [5, 6, 7]}, (1, False)),
        ("/v1/completions", {"prompt": [[5, 6], [7]], "n": 2}, (4, True)),
    ],
)
def test_rooms_needed(path: str, body: dict[str, Any], expected: tuple[int, bool]) -> None:
    assert sequences(path, decode_routing_fields(orjson.dumps(body))) == expected


def test_fields_are_appended_to_the_clients_bytes() -> None:
    boot = Bootstrap("10.0.0.1", 8998, (42,))
    body = b'{"text": "hi",  "x": 1.50}  \n'
    out = boot.into(body)
    assert out.startswith(b'{"text": "hi",  "x": 1.50}'[:-1])  # the client's bytes, as sent
    assert orjson.loads(out) == {
        "text": "hi",
        "x": 1.5,
        "bootstrap_host": "10.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": 42,
    }
    assert orjson.loads(Bootstrap("h", None, (1,)).into(b"{ }")) == {
        "bootstrap_host": "h",
        "bootstrap_port": None,
        "bootstrap_room": 1,
    }


def test_a_clients_own_bootstrap_fields_are_replaced() -> None:
    body = b'{"text": "hi", "bootstrap_room": 7, "bootstrap_host": "evil"}'
    out = orjson.loads(Bootstrap("h", 1, (9,)).into(body))
    assert out == {"text": "hi", "bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 9}


def test_a_batch_gets_arrays_and_the_decode_the_prefills_rank() -> None:
    out = orjson.loads(Bootstrap("h", 1, (3, 4), batch=True, prefill_dp_rank=2).into(b"{}"))
    assert out == {
        "bootstrap_host": ["h", "h"],
        "bootstrap_port": [1, 1],
        "bootstrap_room": [3, 4],
        "disagg_prefill_dp_rank": 2,
    }


def test_rooms_are_distinct_and_within_their_bits() -> None:
    rooms = new_rooms(64, bits=6)  # 64 of the 64 values: all of them, none twice
    assert sorted(rooms) == list(range(64))
    assert all(0 <= r < 2**31 for r in new_rooms(100, bits=31))


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://10.1.2.3:30000", "10.1.2.3"),
        ("http://prefill-0.svc:8000@3", "prefill-0.svc"),
        ("grpc://[fd00::1]:30001", "[fd00::1]"),
    ],
)
def test_the_host_a_decode_worker_reaches(url: str, host: str) -> None:
    assert bootstrap_host(url) == host
