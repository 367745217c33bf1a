"""Each engine's own load report, read through its backend, and the load monitor."""

from __future__ import annotations

import orjson

from shunter.backends.base import Runtime
from shunter.backends.http.engines.base import sum_metrics
from shunter.backends.http.engines.sglang import sglang_load
from shunter.fleet.load_monitor import LoadMonitor
from shunter.wire.mock import MockRequest, MockResponse, UpstreamError

from support.fakes import make_worker

VLLM = """# HELP vllm:num_requests_running Number of requests running
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 2.0
vllm:num_requests_swapped{model_name="m"} 9.0
"""
LLAMACPP = """llamacpp:requests_processing 1
llamacpp:requests_deferred 4
llamacpp:prompt_tokens_total 1200
"""


def test_prometheus_sums_for_vllm_and_llamacpp() -> None:
    assert sum_metrics(VLLM, ("vllm:num_requests_running", "vllm:num_requests_waiting")) == 5
    names = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
    assert sum_metrics(LLAMACPP, names) == 5
    assert sum_metrics("other_metric 1\n", ("vllm:num_requests_running",)) is None


def test_sglang_get_load_and_v1_loads() -> None:
    per_rank = [{"dp_rank": 0, "num_tokens": 100}, {"dp_rank": 1, "num_tokens": 50}]
    assert sglang_load(per_rank, None) == 150
    assert sglang_load(per_rank, 1) == 50
    assert sglang_load({"loads": [{"dp_rank": 0, "num_total_tokens": 7}]}, None) == 7
    assert sglang_load(["garbage"], None) is None


ANSWERS: dict[str, tuple[int, bytes]] = {
    "http://s/v1/loads?include=core": (404, b'{"detail": "Not Found"}'),  # an older SGLang
    "http://s/get_load": (200, b'[{"num_tokens": 12}]'),
    "http://s/metrics": (200, b'sglang:cache_hit_rate{model_name="m"} 0.25\n'),
    "http://v/metrics": (200, VLLM.encode()),
    "http://l/metrics": (200, LLAMACPP.encode()),
    "http://broken/get_load": (500, b"oops"),
    "http://broken/v1/loads?include=core": (200, b"not json"),
}


def scripted(request: MockRequest) -> MockResponse:
    if request.url.startswith("http://raises/"):
        raise RuntimeError("a bug in a load read")
    answer = ANSWERS.get(request.url)
    if answer is None:
        raise UpstreamError("connect", "refused")
    return MockResponse(answer[0], body=answer[1])


async def test_unreadable_loads_are_unknown_not_zero() -> None:
    workers = [
        make_worker("http://s", runtime=Runtime.SGLANG, handler=scripted),
        make_worker("http://v", runtime=Runtime.VLLM, handler=scripted),
        make_worker("http://l", runtime=Runtime.LLAMACPP, handler=scripted),
        make_worker("http://dead", runtime=Runtime.SGLANG, handler=scripted),
        make_worker("http://broken", runtime=Runtime.SGLANG, handler=scripted),
        make_worker("http://o", runtime=Runtime.OPENAI, handler=scripted),
        make_worker("http://raises", runtime=Runtime.SGLANG, handler=scripted),
    ]
    monitor = LoadMonitor(lambda: workers, 1.0)
    for worker in workers:
        worker.state.reported(999, 0.5)
    await monitor.poll_once()
    assert [w.reported_load for w in workers] == [12, 5, 5, None, None, None, None]
    assert [w.state.cache_hit_rate for w in workers] == [0.25, None, None, None, None, None, None]


# A current SGLang's answer (``/v1/loads?include=core``), two DP ranks.
V1_LOADS = {
    "timestamp": "2026-08-01T10:00:00+00:00",
    "version": "0.5.23",
    "accelerator": None,
    "num_accelerators": 1,
    "loads": [
        {"dp_rank": 0, "num_running_reqs": 2, "num_total_tokens": 300, "cache_hit_rate": 0.5},
        {"dp_rank": 1, "num_running_reqs": 1, "num_total_tokens": 40, "cache_hit_rate": 0.25},
    ],
}


class Sglang:
    """An SGLang worker that serves ``/v1/loads`` (current) or only ``/get_load`` (older),
    and counts what it is asked."""

    def __init__(self, current: bool) -> None:
        self.current = current
        self.asked: list[str] = []
        self.down = False

    def __call__(self, request: MockRequest) -> MockResponse:
        path = request.url.removeprefix("http://s")
        self.asked.append(path)
        if self.down:
            raise UpstreamError("connect", "refused")
        if path == "/v1/loads?include=core" and self.current:
            return MockResponse(200, body=orjson.dumps(V1_LOADS))
        if path == "/get_load" and not self.current:
            return MockResponse(200, body=b'[{"dp_rank": 0, "num_tokens": 12}]')
        if path == "/metrics":
            return MockResponse(200, body=b"sglang:cache_hit_rate 0.75\n")
        return MockResponse(404, body=b'{"detail": "Not Found"}')


async def test_sglang_loads_come_from_v1_loads_and_its_hit_rate_without_metrics() -> None:
    worker = Sglang(current=True)
    whole = make_worker("http://s", handler=worker)
    rank = make_worker("http://s@1", handler=worker, dp_rank=1, dp_size=2, base_url="http://s")
    monitor = LoadMonitor(lambda: [whole, rank], 1.0)
    await monitor.poll_once()
    assert (whole.reported_load, whole.state.cache_hit_rate) == (340, 0.375)
    assert (rank.reported_load, rank.state.cache_hit_rate) == (40, 0.25)
    assert worker.asked == ["/v1/loads?include=core"] * 2  # no /get_load, no /metrics


async def test_an_older_sglang_is_not_asked_for_v1_loads_on_every_poll() -> None:
    worker = Sglang(current=False)
    monitor = LoadMonitor(lambda: [target], 1.0)
    target = make_worker("http://s", handler=worker)
    for _ in range(3):
        await monitor.poll_once()
        assert (target.reported_load, target.state.cache_hit_rate) == (12, 0.75)
    loads = [path for path in worker.asked if path != "/metrics"]
    assert loads == ["/v1/loads?include=core", "/get_load", "/get_load", "/get_load"]
    # Upgraded in place: /get_load is gone, so both are looked for again, and /v1/loads kept.
    worker.current = True
    worker.asked.clear()
    await monitor.poll_once()
    assert target.reported_load is None  # that poll's remembered path failed
    for _ in range(2):
        await monitor.poll_once()
        assert target.reported_load == 340
    assert worker.asked == ["/get_load", *["/v1/loads?include=core"] * 2]


async def test_a_worker_that_does_not_answer_is_asked_once_per_poll() -> None:
    worker = Sglang(current=True)
    worker.down = True
    target = make_worker("http://s", handler=worker)
    await LoadMonitor(lambda: [target], 1.0).poll_once()
    assert target.reported_load is None and worker.asked == ["/v1/loads?include=core"]
