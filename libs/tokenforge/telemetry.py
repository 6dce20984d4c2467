"""OpenTelemetry set-up and the span → receipt-attempt mapping.

Every service records spans; export happens only when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, through a batch processor with a queue large
enough for bursts. The router's receipts are built from its attempt spans by
`AttemptCollector`, a span processor that sees every attempt span whatever the sampler
decided: the sampler below records every span and only lets the configured sampler decide
what is exported.

GenAI semantic conventions followed: OpenTelemetry semconv 1.37 (gen_ai.* still in
development), with `gen_ai.provider.name` rather than the older `gen_ai.system`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

GENAI_SEMCONV_VERSION = "1.37.0"
ATTEMPT_SPAN_MARK = "tf.attempt"
EXPORT_QUEUE_SIZE = 65_536
EXPORT_BATCH_SIZE = 2_048


class RecordAlways(Sampler):
    """Record every span (so our processors see it); export only what `inner` samples."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        result = self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision == Decision.DROP:
            # A DROP result carries no attributes, and the SDK gives the span the result's
            # attributes: hand the span's own back, or a recorded-only span starts empty.
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"RecordAlways({self._inner.get_description()})"


def _configured_sampler() -> Sampler:
    ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    if os.environ.get("OTEL_TRACES_SAMPLER", "").endswith("traceidratio") and ratio:
        return ParentBased(TraceIdRatioBased(float(ratio)))
    return ParentBased(ALWAYS_ON)


def exporting() -> bool:
    """Whether spans leave this process (the standard OTLP variables are set)."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, *processors: SpanProcessor) -> TracerProvider:
    """Install the global tracer provider for this process."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"tokenforge-{service_name}"}),
        sampler=RecordAlways(_configured_sampler()),
    )
    for processor in processors:
        provider.add_span_processor(processor)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(),
                max_queue_size=EXPORT_QUEUE_SIZE,
                max_export_batch_size=EXPORT_BATCH_SIZE,
            )
        )
    trace.set_tracer_provider(provider)
    return provider


class AttemptCollector(SpanProcessor):
    """Keeps the ended attempt spans of requests in flight, by the request's span id.

    The router opens a request span, runs attempts as its children, then `take()`s the
    finished attempt spans to build the receipt. Bounded: a request that never takes its
    spans (it should not happen) is dropped once the table passes `max_requests`.
    """

    def __init__(self, max_requests: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._by_parent: dict[int, list[ReadableSpan]] = {}
        self._max_requests = max_requests

    def on_end(self, span: ReadableSpan) -> None:
        attrs = span.attributes or {}
        if ATTEMPT_SPAN_MARK not in attrs or span.parent is None:
            return
        with self._lock:
            if len(self._by_parent) >= self._max_requests and span.parent.span_id not in self._by_parent:
                self._by_parent.pop(next(iter(self._by_parent)))
            self._by_parent.setdefault(span.parent.span_id, []).append(span)

    def take(self, request_span_id: int) -> list[ReadableSpan]:
        with self._lock:
            spans = self._by_parent.pop(request_span_id, [])
        spans.sort(key=lambda s: int((s.attributes or {})[ATTEMPT_SPAN_MARK]))
        return spans

    def shutdown(self) -> None:
        with self._lock:
            self._by_parent.clear()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def hex_trace_id(trace_id: int) -> str:
    return format(trace_id, "032x")


def hex_span_id(span_id: int) -> str:
    return format(span_id, "016x")
