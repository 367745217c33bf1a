"""OpenTelemetry tracing (``--enable-trace``), exported over OTLP/gRPC as smg does.

Per routed request: a server span ``route`` (continuing the client's W3C ``traceparent``
when it sent one), a child ``select_worker`` span, and a client span ``upstream`` around the
worker call, whose context goes to the worker as ``traceparent``/``tracestate``. For a
streamed reply, ``route`` and ``upstream`` last until the stream ends, not until its head
arrives. Without
``--enable-trace`` none of this is imported or run: the router checks one attribute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("shunter.tracing")

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


class Tracing:
    def __init__(self, endpoint: str, service_name: str = "shunter", exporter: Any = None) -> None:
        """Spans go to the OTLP collector at ``endpoint``, or to ``exporter`` (a span exporter
        that tests read in process) when one is given."""
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.propagators.textmap import DefaultGetter, DefaultSetter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "--enable-trace needs the tracing extra: pip install 'shunter[trace]'"
            ) from exc
        if "://" not in endpoint:
            endpoint = "http://" + endpoint  # as smg: a bare host:port is plain HTTP/2
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            otlp = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
            self.provider.add_span_processor(
                BatchSpanProcessor(otlp, schedule_delay_millis=500, max_export_batch_size=64)
            )
        self.tracer = self.provider.get_tracer("shunter")
        self.propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        self._setter = DefaultSetter()
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        log.info("tracing on", extra={"endpoint": endpoint})

    def incoming(self, headers: list[tuple[bytes, bytes]]) -> Any:
        """The trace context a client sent (``traceparent``/``tracestate``), if any."""
        carrier = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in TRACE_HEADERS
        }
        return self.propagator.extract(carrier, getter=self._getter)

    @contextmanager
    def span(
        self,
        name: str,
        context: Any = None,
        client: bool = False,
        held: bool = False,
        **attributes: Any,
    ) -> Iterator[Any]:
        """A span, current inside the block. ``held``: it does not end with the block (its
        holder calls ``end()``, as a stream's relay does at the stream's end), unless the
        block raises."""
        kind = self._client if client else self._server if context is not None else None
        options: dict[str, Any] = {"attributes": attributes}
        if kind is not None:
            options["kind"] = kind
        if context is not None:
            options["context"] = context
        span = None
        try:
            with self.tracer.start_as_current_span(name, end_on_exit=not held, **options) as span:
                yield span
        except BaseException:
            if held and span is not None:
                span.end()
            raise

    def outgoing(self) -> list[tuple[bytes, bytes]]:
        """Headers carrying the current span's context to the worker."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, setter=self._setter)  # type: ignore[misc]
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

    def shutdown(self) -> None:
        self.provider.shutdown()
