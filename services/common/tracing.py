"""W3C trace context across Sightline: one frame (or one gRPC request) can be followed through every service.

A trace starts when capture publishes a frame; its context travels in the Kafka record headers (``traceparent``,
``tracestate``) from stage to stage, and in the gRPC metadata of the request path. Every process runs the
OpenTelemetry SDK, so trace and span ids are generated even when nothing is exported (the default): the JSON log
lines written while a span is current carry its ``trace_id`` and ``span_id``, and one frame can be followed in the
logs without a collector. Exporting to the console or to an OTLP collector is a setting.

Spans carry ids, counts, topics and reasons only: never images, chips or descriptors.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings

log = logging.getLogger(__name__)

# W3C trace context only (no baggage): what we inject is exactly ``traceparent`` and ``tracestate``, whatever
# OTEL_PROPAGATORS says, so every Sightline process speaks the same two headers.
_PROPAGATOR = TraceContextTextMapPropagator()
FIELDS = frozenset(_PROPAGATOR.fields)

# A proxy until setup_tracing installs the SDK provider; modules can hold it from import time.
tracer = trace.get_tracer("sightline")

KafkaHeaders = list[tuple[str, bytes]]
Metadata = Sequence[tuple[str, str | bytes]]


class TracingError(RuntimeError):
    """Tracing cannot be set up as configured; the message says what to install or change."""


class TracingSettings(SightlineSettings):
    """Trace context and span export (``SIGHTLINE_TRACING_*``); the same for every service."""

    config_section: ClassVar[str] = "tracing"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_TRACING_", extra="ignore")

    exporter: Literal["none", "console", "otlp"] = Field(
        "none",
        description="Where finished spans go: nowhere (ids are still made, propagated and logged), "
        "one JSON line per span on stdout, or an OTLP/gRPC collector.",
    )
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4317",
        description="OTLP/gRPC collector address when the exporter is otlp (http:// for plaintext, https:// for TLS).",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces (frames, requests) that are recorded and exported; "
        "a trace started elsewhere follows its parent's decision. Ids propagate either way.",
    )
    service_name: str | None = Field(None, description="service.name of the spans (default: sightline-<service>).")


_provider: TracerProvider | None = None


def setup_tracing(service: str, settings: TracingSettings | None = None) -> TracerProvider:
    """Install the SDK tracer provider for this process (once) and put trace ids into log records."""
    global _provider
    if _provider is not None:
        return _provider
    settings = settings or TracingSettings()
    processor = _processor(settings)  # first: a missing exporter package fails before anything is installed
    resource = Resource.create({"service.name": settings.service_name or f"sightline-{service}"})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _install_log_ids()
    _provider = provider
    log.info("tracing ready", extra={"exporter": settings.exporter, "sample_ratio": settings.sample_ratio})
    return provider


def _processor(settings: TracingSettings) -> SpanProcessor | None:
    if settings.exporter == "none":
        return None  # spans are still made (ids for propagation and logs), just never exported
    exporter = _console_exporter() if settings.exporter == "console" else _otlp_exporter(settings.otlp_endpoint)
    # Batched off the hot path: a span ends in microseconds, export happens on the processor's own thread.
    return BatchSpanProcessor(exporter)


def _console_exporter() -> SpanExporter:
    # One compact JSON object per line on stdout (logs go to stderr), so log collectors still read JSON lines.
    return ConsoleSpanExporter(out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n")


def _otlp_exporter(endpoint: str) -> SpanExporter:
    try:  # imported only when asked for: most deployments export nothing
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingError(
            "SIGHTLINE_TRACING_EXPORTER=otlp needs the opentelemetry-exporter-otlp-proto-grpc package "
            f"({exc}); install it, or set SIGHTLINE_TRACING_EXPORTER to none or console"
        ) from None
    return OTLPSpanExporter(endpoint=endpoint)


# --- trace ids in log records ------------------------------------------------------------------------------------


def _install_log_ids() -> None:
    """Every log record made while a span is current gets its ``trace_id`` and ``span_id`` (as JSON fields).

    A record factory rather than a handler filter: it holds for every handler, including ones installed later.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "sightline_trace_ids", False):
        return
    logging.setLogRecordFactory(_TraceIdRecordFactory(previous))


class _TraceIdRecordFactory:
    """The record factory of ``_install_log_ids``, around the one it replaced."""

    sightline_trace_ids = True  # what _install_log_ids looks for, so that it wraps the factory only once

    def __init__(self, previous: Callable[..., logging.LogRecord]) -> None:
        self._previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self._previous(*args, **kwargs)
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        return record


# --- carriers: Kafka headers and gRPC metadata -------------------------------------------------------------------


def _context_of(span: trace.Span | None) -> otel_context.Context | None:
    return trace.set_span_in_context(span) if span is not None else None  # None: the current context


def kafka_headers(span: trace.Span | None = None) -> KafkaHeaders:
    """Record headers carrying the span's context (the current one when no span is given); empty when none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=_context_of(span))
    return [(key, value.encode("ascii")) for key, value in carrier.items()]


def context_from_headers(headers: Iterable[tuple[str, bytes | str]] | None) -> otel_context.Context:
    """The context a record's headers carry; an empty context (a new trace) when they carry none or garbage."""
    carrier = {key: _text(value) for key, value in headers or () if key in FIELDS}
    return _PROPAGATOR.extract(carrier) if carrier else otel_context.Context()


def metadata_with_context(metadata: Metadata | None = None, span: trace.Span | None = None) -> list[tuple[str, Any]]:
    """gRPC metadata with the span's context (the current one when no span is given) in place of any old one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=_context_of(span))
    kept = [(key, value) for key, value in metadata or () if key not in FIELDS]
    return [*kept, *carrier.items()]


def context_from_metadata(metadata: Metadata | None) -> otel_context.Context:
    """The context of incoming gRPC metadata (``context.invocation_metadata()``); empty when it carries none."""
    return context_from_headers((item[0], item[1]) for item in metadata or ())


def _text(value: bytes | str) -> str:
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value


# --- spans -------------------------------------------------------------------------------------------------------


@contextmanager
def activated(span: trace.Span | None) -> Iterator[None]:
    """Make the span current in this thread for the block (logs get its ids); nothing when there is no span."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def parse_traceparent(value: str) -> tuple[str, str]:
    """(trace id, span id) of a ``traceparent`` value, in hex; ("", "") when it is not a valid one."""
    span_context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": value})).get_span_context()
    if not span_context.is_valid:
        return "", ""
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
