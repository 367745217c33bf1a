"""Each engine's own load report, read through its backend, and the load monitor."""

from __future__ import annotations

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
    "http://s/get_load": (200, b'[{"num_tokens": 12}]'),
    "http://s/metrics": (200, b'sglang:cache_hit_rate{model_name="m"} 0.25\n'),
    "http://v/metrics": (200, VLLM.encode()),
    "http://l/metrics": (200, LLAMACPP.encode()),
    "http://broken/get_load": (500, b"oops"),
    "http://broken/v1/loads": (200, b"not json"),
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
