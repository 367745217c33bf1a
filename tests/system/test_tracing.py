"""--enable-trace: spans exported over OTLP/gRPC to a collector in the test, W3C context
carried from the client through the gateway to the worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from support.harness import Gateway, Proc, Sim, free_port, wait_for


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[object] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield servicer, port
    server.stop(0)


def test_spans_reach_the_collector_and_the_trace_reaches_the_worker(
    collector: tuple[Collector, int], procs: list[Proc]
) -> None:
    servicer, port = collector
    sim = Sim("traced")
    procs.append(sim)
    gateway = Gateway(
        "--enable-trace", "--otlp-traces-endpoint", f"127.0.0.1:{port}", workers=[sim.url]
    )
    procs.append(gateway)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    response = httpx.post(
        gateway.url + "/v1/completions",
        json={"prompt": "x"},
        headers={"traceparent": parent, "tracestate": "vendor=1"},
    )
    assert response.status_code == 200

    def names() -> set[str]:
        with servicer.lock:
            return {s.name for s in servicer.spans if s.trace_id.hex() == trace_id}  # type: ignore[attr-defined]

    wait_for(lambda: {"route", "select_worker", "upstream"} <= names(), 15, "the spans")
    with servicer.lock:
        spans = {s.name: s for s in servicer.spans if s.trace_id.hex() == trace_id}  # type: ignore[attr-defined]
    route, upstream = spans["route"], spans["upstream"]
    assert route.parent_span_id.hex() == "00f067aa0ba902b7"  # type: ignore[attr-defined]
    assert upstream.parent_span_id == route.span_id  # type: ignore[attr-defined]
    assert spans["select_worker"].parent_span_id == route.span_id  # type: ignore[attr-defined]
    sent = sim.requests()[-1]["headers"]
    assert sent["traceparent"] == [f"00-{trace_id}-{upstream.span_id.hex()}-01"]  # type: ignore[attr-defined]
    assert sent["tracestate"] == ["vendor=1"]
