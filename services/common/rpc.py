"""gRPC plumbing shared by every server and client: the server with health and reflection, channels, and errors.

Every Sightline server serves the standard gRPC health protocol (so Kubernetes probes are plain ``grpc:`` probes and
``sightline status`` can ask any process) and server reflection (so ``grpcurl`` works without the protos).

Trace context rides in the metadata (``traceparent``): every server runs each call in a server span, a child of the
caller's context, and logs one line per call with its trace id; every channel made here passes the current context
on, so a request can be followed from the gallery API to detection and embedding. Health and reflection calls
(probes, every few seconds) are neither traced nor logged.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from sightline.common import tracing

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # enrolment images and 1:1 probes arrive as whole photos
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class InvalidInput(ValueError):
    """The caller sent something that cannot be processed; becomes INVALID_ARGUMENT with this message."""


class NotFound(LookupError):
    """The caller named something that does not exist; becomes NOT_FOUND with this message."""


F = TypeVar("F", bound=Callable[..., Any])


def rpc_errors(method: F) -> F:
    """Turn InvalidInput/NotFound raised by a servicer method into the matching gRPC status with a clear message."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except InvalidInput as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    return wrapper  # type: ignore[return-value]


class GrpcServer:
    """A threaded gRPC server with the health service and reflection; marks itself SERVING when started."""

    def __init__(self, host: str, port: int, workers: int = 8) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS,
                                   interceptors=[_ServerTracing()])  # fmt: skip
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")

    def add(self, register: Callable[[Any, grpc.Server], None], servicer: Any, full_name: str) -> None:
        """Register a servicer, e.g. ``add(add_GalleryServiceServicer_to_server, impl, "sightline.v1.GalleryService")``."""
        register(servicer, self._server)
        self._names.append(full_name)

    def start(self) -> None:
        reflection.enable_server_reflection(self._names, self._server)
        self._server.start()
        self.set_serving(True)
        log.info("gRPC server listening", extra={"port": self.port, "services": self._names[2:]})

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._names[2:]]:
            self._health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        self.set_serving(False)
        self._server.stop(grace).wait()


def channel(address: str) -> grpc.Channel:
    """An insecure channel with Sightline's message size limits that passes the current trace context on."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=CHANNEL_OPTIONS), _ClientTracing())


def check_health(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The health status of a server as a name ("SERVING", ...), or "UNREACHABLE"."""
    with channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# --- trace context -----------------------------------------------------------------------------------------------

_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


class _ServerTracing(grpc.ServerInterceptor):
    """Runs each call in a server span, a child of the context in the caller's metadata."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(_UNTRACED):
            return handler
        parent = tracing.context_from_metadata(details.invocation_metadata)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _traced_unary(handler.unary_unary, details.method, parent),
                handler.request_deserializer, handler.response_serializer)  # fmt: skip
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _traced_stream(handler.unary_stream, details.method, parent),
                handler.request_deserializer, handler.response_serializer)  # fmt: skip
        return handler  # Sightline has no client-streaming methods; they would run untraced


def _traced_unary(behavior: Callable[[Any, Any], Any], method: str, parent: Context) -> Callable[[Any, Any], Any]:
    def traced(request: Any, context: grpc.ServicerContext) -> Any:
        with _server_span(method, parent, context):
            return behavior(request, context)

    return traced


def _traced_stream(behavior: Callable[[Any, Any], Iterator[Any]], method: str, parent: Context) -> Callable[[Any, Any], Iterator[Any]]:  # noqa: E501
    def traced(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # The sync server drains the response iterator on the same worker thread, so the span stays current
        # for the whole stream.
        with _server_span(method, parent, context):
            yield from behavior(request, context)

    return traced


@contextmanager
def _server_span(method: str, parent: Context, context: grpc.ServicerContext) -> Iterator[None]:
    """The call's span, current for the handler; on the way out, its status and one log line with its trace id."""
    started = time.perf_counter()
    attributes = {"rpc.system": "grpc", "rpc.method": method}
    with tracing.tracer.start_as_current_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                                              attributes=attributes, record_exception=False,
                                              set_status_on_exception=False) as span:  # fmt: skip
        code = grpc.StatusCode.UNKNOWN  # an exception other than an abort ends the call as UNKNOWN
        try:
            yield
            code = _code_of(context) or grpc.StatusCode.OK
        except BaseException:
            code = _code_of(context) or code
            raise
        finally:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            log.info("rpc", extra={"method": method, "code": code.name,
                                   "ms": round(1000 * (time.perf_counter() - started), 1)})  # fmt: skip


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()  # set by abort() or set_code(); None when the handler left it alone
    return code if isinstance(code, grpc.StatusCode) else None


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),  # noqa: E501
    grpc.ClientCallDetails,
):
    pass


class _ClientTracing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Puts the current trace context into each call's metadata (nothing when no span is current)."""

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:  # noqa: E501
        return continuation(_with_context(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:  # noqa: E501
        return continuation(_with_context(details), request)


def _with_context(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    if not trace.get_current_span().get_span_context().is_valid:
        return details  # e.g. the CLI: its own metadata (possibly a traceparent) goes through untouched
    return _CallDetails(details.method, details.timeout, tracing.metadata_with_context(details.metadata),
                        details.credentials, details.wait_for_ready, details.compression)  # fmt: skip
