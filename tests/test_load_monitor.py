"""Reading each runtime's own load report."""

from __future__ import annotations

from shunter.fleet.load_monitor import LoadMonitor, sglang_load, sum_metrics
from shunter.fleet.worker import Runtime, Worker
from shunter.transport.base import FullResponse, HeaderPairs, UpstreamError

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
    assert sum_metrics(LLAMACPP, ("llamacpp:requests_processing",
                                  "llamacpp:requests_deferred")) == 5  # fmt: skip
    assert sum_metrics("other_metric 1\n", ("vllm:num_requests_running",)) is None


def test_sglang_get_load_and_v1_loads() -> None:
    per_rank = [{"dp_rank": 0, "num_tokens": 100}, {"dp_rank": 1, "num_tokens": 50}]
    assert sglang_load(per_rank, None) == 150
    assert sglang_load(per_rank, 1) == 50
    assert sglang_load({"loads": [{"dp_rank": 0, "num_total_tokens": 7}]}, None) == 7
    assert sglang_load(["garbage"], None) is None


class Scripted:
    def __init__(self, answers: dict[str, tuple[int, bytes] | None]) -> None:
        self.answers = answers

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        answer = self.answers.get(url)
        if answer is None:
            raise UpstreamError("connect", "refused")
        return FullResponse(answer[0], [], answer[1])

    async def close(self) -> None:
        pass


async def test_unreadable_loads_are_unknown_not_zero() -> None:
    sglang = Worker(url="http://s", runtime=Runtime.SGLANG)
    vllm = Worker(url="http://v", runtime=Runtime.VLLM)
    dead = Worker(url="http://dead", runtime=Runtime.SGLANG)
    broken = Worker(url="http://broken", runtime=Runtime.SGLANG)
    plain = Worker(url="http://o", runtime=Runtime.OPENAI)
    client = Scripted({
        "http://s/get_load": (200, b'[{"num_tokens": 12}]'),
        "http://v/metrics": (200, VLLM.encode()),
        "http://broken/get_load": (500, b"oops"),
        "http://broken/v1/loads": (200, b"not json"),
    })  # fmt: skip
    workers = [sglang, vllm, dead, broken, plain]
    monitor = LoadMonitor(lambda: workers, client, 1.0)  # type: ignore[arg-type]
    for worker in workers:
        worker.reported_load = 999
    await monitor.poll_once()
    assert [w.reported_load for w in workers] == [12, 5, None, None, None]
