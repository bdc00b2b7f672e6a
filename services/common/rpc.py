"""gRPC plumbing shared by every server and client: the server with health and reflection, channels, and errors.

A servicer is registered by itself (``GrpcServer.add(impl)``): the service it implements, its full name and its
registration function are read from the generated code (``grpc_service``), so no name is typed twice.

Every Sightline server serves the standard gRPC health protocol (so Kubernetes probes are plain ``grpc:`` probes and
``sightline status`` can ask any process) and server reflection (so ``grpcurl`` works without the protos); both are
open to callers without credentials.

Trace context rides in the metadata (``traceparent``): every server runs each call in a server span, a child of the
caller's context, and logs one line per call with its trace id; every channel made here passes the current context
on, so a request can be followed from the gallery API to detection and embedding. Health and reflection calls
(probes, every few seconds) are neither traced nor logged.

Access control and TLS live here too: a server given an ``AccessPolicy`` admits each call (bearer token or client
certificate, and the method's role, see ``auth.py``) before its handler runs, refusing it with UNAUTHENTICATED or
PERMISSION_DENIED and reporting the refusal; a server given credentials speaks TLS (mutual TLS with a client CA, see
``tls.py``). Every channel made here sends the caller's bearer token and uses TLS when the process is configured to;
a token never goes in clear text to another machine unless ``SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS`` allows it.

Every server bounds what its calls may hold (``serverlimits.py``): streams beyond their pool (threads for streams,
a share of those for callers without credentials, health Watch streams) and calls beyond ``maximum_concurrent_rpcs``
are refused with RESOURCE_EXHAUSTED, and idle streams are cancelled; and each request's strings and lists are checked
against ``limits.py`` before its handler runs (INVALID_ARGUMENT naming the field). These refusals are reported like
access refusals (``on_denied``), so a service audits them too.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from sightline.common import auth, limits, tracing
from sightline.common.serverlimits import OpenStream, ServerLimits, StreamGate, StreamsExhausted
from sightline.common.tls import TlsSettings, channel_credentials, refuse_plaintext_token

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


class Unavailable(RuntimeError):
    """Something the call needs (a peer service, the broker) cannot be used now; becomes UNAVAILABLE (retry later)."""


F = TypeVar("F", bound=Callable[..., Any])
Behavior = Callable[[Any, grpc.ServicerContext], Any]


_STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_MAPPED = tuple(_STATUS_OF)


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code = next(code for kind, code in _STATUS_OF.items() if isinstance(exc, kind))
    context.abort(code, str(exc))


def rpc_errors(method: F) -> F:
    """Turn InvalidInput/NotFound/Unavailable raised by a servicer method into the matching gRPC status with a clear
    message (for a streaming method, those raised before it returns its stream; ``stream_errors`` for the rest)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except _MAPPED as exc:
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def stream_errors(responses: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    """A response stream whose InvalidInput/NotFound/Unavailable, raised while it streams, end the call with the
    matching status and message instead of UNKNOWN."""
    try:
        yield from responses
    except _MAPPED as exc:
        _abort(context, exc)


LIVENESS_SERVICE = "sightline.liveness"
"""A health service name that is SERVING from start to stop, whatever ``set_serving`` says: for liveness probes, so
that a replica that is up but not ready (e.g. matching while it cannot reach its database) is not restarted."""
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
GENERATED_PACKAGE = "sightline.v1"  # where ``make protos`` puts the generated modules


@dataclass(frozen=True)
class GrpcService:
    """A service of the protos as the generated code has it: its full name and the function registering an
    implementation with a ``grpc.Server``."""

    full_name: str  # e.g. "sightline.v1.GalleryService", from the descriptor
    register: Callable[[Any, grpc.Server], None]  # e.g. gallery_pb2_grpc.add_GalleryServiceServicer_to_server


def grpc_service(servicer: Any) -> GrpcService:
    """The service a servicer (or servicer class) implements, found from the generated ``<Name>Servicer`` base class
    in its MRO: the full name from the ``*_pb2`` module's descriptor, the registration from ``*_pb2_grpc``.

    TypeError when it subclasses no generated servicer, or several (one object serves one service), or leaves an
    RPC of its service to the generated base (which would answer UNIMPLEMENTED instead of failing at start-up).
    """
    cls = servicer if isinstance(servicer, type) else type(servicer)
    bases = [
        base
        for base in cls.__mro__
        if base.__module__.startswith(f"{GENERATED_PACKAGE}.")
        and base.__module__.endswith("_pb2_grpc")
        and base.__name__.endswith("Servicer")
    ]
    if len(bases) != 1:
        found = ", ".join(f"{base.__module__}.{base.__name__}" for base in bases) or "none"
        raise TypeError(
            f"{cls.__qualname__} must subclass exactly one generated {GENERATED_PACKAGE} *Servicer "
            f"class (found: {found})"
        )
    [base] = bases
    generated = importlib.import_module(base.__module__)
    messages = importlib.import_module(base.__module__.removesuffix("_grpc"))
    descriptor = messages.DESCRIPTOR.services_by_name.get(base.__name__.removesuffix("Servicer"))
    register = getattr(generated, f"add_{base.__name__}_to_server", None)
    if descriptor is None or register is None:
        raise TypeError(f"{base.__module__}.{base.__name__} is not the servicer of a service in {messages.__name__}")
    missing = [m.name for m in descriptor.methods if getattr(cls, m.name, None) is getattr(base, m.name, None)]
    if missing:
        raise TypeError(f"{cls.__qualname__} does not implement {', '.join(missing)} of {descriptor.full_name}")
    return GrpcService(descriptor.full_name, register)


class GrpcServer:
    """A threaded gRPC server with the health service and reflection; marks itself SERVING when started.

    Health: service "" and each API's name follow ``set_serving`` (readiness); ``LIVENESS_SERVICE`` is SERVING while
    the server runs.

    With ``access``, every call but health and reflection must be admitted by it; calls over ``limits`` (by default
    derived from ``workers``, see ``ServerLimits.for_workers``) or over the field limits are refused. Each refusal is
    passed to ``on_denied`` (e.g. to audit it). With ``credentials``, the port speaks TLS only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        workers: int = 8,
        *,
        access: auth.AccessPolicy | None = None,
        on_denied: Callable[[auth.Denial], None] | None = None,
        credentials: grpc.ServerCredentials | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        limits = limits or ServerLimits.for_workers(workers)
        self._gate = StreamGate(limits)
        interceptors: list[grpc.ServerInterceptor] = [_ServerTracing()]
        if access is not None:
            interceptors.append(_ServerAuth(access, on_denied))  # inside tracing: refusals are traced and logged
        # Inside auth: refusals name the caller, and a caller without credentials never takes an API stream's slot.
        interceptors += [_FieldLimits(on_denied), _StreamLimits(self._gate, on_denied)]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=CHANNEL_OPTIONS + limits.server_options(),
            interceptors=interceptors,
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        self._access = access
        self._tls = credentials is not None
        self._health = health.HealthServicer()
        self._serving_lock = threading.Lock()  # set_serving may be called from a service's own threads
        self._stopping = False
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        target = f"{host}:{port}"
        self.port = (
            self._server.add_secure_port(target, credentials)
            if credentials is not None
            else self._server.add_insecure_port(target)
        )
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")

    def add(self, servicer: Any, service: GrpcService | None = None) -> None:
        """Register a servicer (a subclass of its generated ``<Name>Servicer``, see ``grpc_service``), e.g.
        ``add(GalleryServicer(...))``; it is named in health and reflection by its service's full name. ``service``:
        what ``grpc_service`` already found for it, if the caller has it."""
        service = service or grpc_service(servicer)
        service.register(servicer, self._server)
        self._names.append(service.full_name)

    def start(self) -> None:
        reflection.enable_server_reflection(self._names, self._server)
        self._gate.start()
        self._server.start()
        self._health.set(LIVENESS_SERVICE, _STATUS[True])
        self.set_serving(True)
        if self._access is None:
            log.warning(
                "gRPC AUTHENTICATION IS OFF: any client that reaches port %d may call every method, "
                "unaudited as to who it is; set SIGHTLINE_AUTH_TOKENS_FILE (docs/security.md)",
                self.port,
            )
        elif not self._access.required:
            log.warning("gRPC calls without credentials are admitted (SIGHTLINE_AUTH_REQUIRED=false)")
        log.info(
            "gRPC server listening",
            extra={"port": self.port, "services": self._names[2:], "tls": self._tls, "auth": self._access is not None},
        )

    def set_serving(self, serving: bool) -> None:
        """Whether the server (service "") and its APIs are ready for calls; once stopping, never SERVING again."""
        with self._serving_lock:
            serving = serving and not self._stopping
            for name in ["", *self._names[2:]]:
                self._health.set(name, _STATUS[serving])

    def stop(self, grace: float = 5.0) -> None:
        with self._serving_lock:
            self._stopping = True
        self.set_serving(False)
        self._health.set(LIVENESS_SERVICE, _STATUS[False])
        self._server.stop(grace).wait()
        self._gate.stop()


def channel(address: str, token: str | None = None, tls: TlsSettings | None = None) -> grpc.Channel:
    """A channel with Sightline's message size limits that passes the current trace context and a bearer token on.

    ``token``: None sends this process's token for ``address`` (``auth.outgoing_token``), "" sends none. TLS (and
    a client certificate) as ``tls`` says, by default the process's ``SIGHTLINE_TLS_*`` settings. Raises
    ``tls.PlaintextTokenError`` for a token over plaintext to a non-loopback address, unless the settings allow it.
    """
    token = auth.outgoing_token(address) if token is None else token.strip()
    tls = tls or TlsSettings()
    credentials = channel_credentials(tls)
    if token and credentials is None:
        refuse_plaintext_token(address, tls)
    raw = (
        grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        if credentials is not None
        else grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    )
    interceptors: list[Any] = [_ClientTracing()]
    if token:
        interceptors.append(_ClientToken(token))
    return grpc.intercept_channel(raw, *interceptors)


def check_health(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The health status of a server as a name ("SERVING", ...), or "UNREACHABLE"."""
    with channel(address, token="") as ch:  # health is open: no token needed
        try:
            # types-grpcio-health-checking declares HealthStub without its methods (they are set in __init__).
            check = health_pb2_grpc.HealthStub(ch).Check  # type: ignore[attr-defined]
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# --- trace context -----------------------------------------------------------------------------------------------

_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


def _wrapped(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Behavior], Behavior],
    streaming: Callable[[Behavior], Behavior],
    *,
    raw_requests: bool = False,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with its behaviour wrapped: by ``unary`` when it returns one response, ``streaming`` otherwise.
    ``raw_requests``: the behaviour gets each request's bytes, to parse itself (grpcio gives no deserializer's error
    to the servicer: it answers INTERNAL)."""
    deserializer = None if raw_requests else handler.request_deserializer
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming),
    )
    for attribute, make, wrap in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(wrap(behavior), deserializer, handler.response_serializer)
    raise ValueError("a gRPC method handler without a behaviour")


class _ServerTracing(grpc.ServerInterceptor):
    """Runs each call in a server span, a child of the context in the caller's metadata."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(_UNTRACED):
            return handler
        parent = tracing.context_from_metadata(details.invocation_metadata)
        return _wrapped(
            handler,
            lambda behavior: _traced_unary(behavior, details.method, parent),
            lambda behavior: _traced_stream(behavior, details.method, parent),
        )


def _traced_unary(behavior: Behavior, method: str, parent: Context) -> Behavior:
    def traced(request: Any, context: grpc.ServicerContext) -> Any:
        with _server_span(method, parent, context):
            return behavior(request, context)

    return traced


def _traced_stream(behavior: Behavior, method: str, parent: Context) -> Behavior:
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
    with tracing.tracer.start_as_current_span(
        method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
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
            log.info(
                "rpc",
                extra={"method": method, "code": code.name, "ms": round(1000 * (time.perf_counter() - started), 1)},
            )


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    # set by abort() or set_code(); None when the handler left it alone. grpc has had ServicerContext.code() since
    # 1.38; types-grpcio does not declare it.
    code = context.code()  # type: ignore[attr-defined]
    return code if isinstance(code, grpc.StatusCode) else None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _ClientTracing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Puts the current trace context into each call's metadata (nothing when no span is current)."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_with_context(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_with_context(details), request)


def _with_context(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    if not trace.get_current_span().get_span_context().is_valid:
        return details  # e.g. the CLI: its own metadata (possibly a traceparent) goes through untouched
    return _CallDetails(
        details.method,
        details.timeout,
        tracing.metadata_with_context(details.metadata),
        details.credentials,
        details.wait_for_ready,
        details.compression,
    )


# --- access control ------------------------------------------------------------------------------------------------


class _ServerAuth(grpc.ServerInterceptor):
    """Admits each call through the access policy before its handler runs, as the caller ``auth.current_caller``
    names; refuses it otherwise, after reporting the refusal. Health and reflection pass untouched.

    The decision is made in the handler (on a worker thread), not here: interceptors run on the server's polling
    thread, which must not wait on an audit write.
    """

    def __init__(self, access: auth.AccessPolicy, on_denied: Callable[[auth.Denial], None] | None) -> None:
        self._access = access
        self._on_denied = on_denied

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or auth.is_open(details.method):
            return handler
        method = details.method
        return _wrapped(
            handler,
            lambda behavior: self._guarded_unary(behavior, method),
            lambda behavior: self._guarded_stream(behavior, method),
        )

    def _guarded_unary(self, behavior: Behavior, method: str) -> Behavior:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._admit(method, context)
            with auth.authenticated_as(caller):
                return behavior(request, context)

        return guarded

    def _guarded_stream(self, behavior: Behavior, method: str) -> Behavior:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._admit(method, context)
            # The caller is current only while the servicer's code runs, never across a yield: a stream the client
            # abandons may be closed from another thread.
            with auth.authenticated_as(caller):
                responses = iter(behavior(request, context))
            while True:
                with auth.authenticated_as(caller):
                    try:
                        response = next(responses)
                    except StopIteration:
                        return
                yield response

        return guarded

    def _admit(self, method: str, context: grpc.ServicerContext) -> auth.Caller | None:
        try:
            caller = self._access.admit(method, auth.bearer_of(context.invocation_metadata()), _certificate_cn(context))
        except auth.AccessDenied as refused:
            _refuse(
                auth.Denial(refused.code, refused.principal, method, refused.reason, context.peer() or ""),
                context,
                self._on_denied,
            )
            raise  # unreachable: _refuse aborts
        if caller is not None:
            trace.get_current_span().set_attribute("enduser.id", caller.principal)  # the call's server span
        return caller


def _refuse(
    denial: auth.Denial, context: grpc.ServicerContext, on_denied: Callable[[auth.Denial], None] | None
) -> NoReturn:
    """Log the refusal, report it to ``on_denied`` and end the call with its status; raises (``context.abort``)."""
    log.warning(
        "call refused",
        extra={
            "method": denial.method,
            "code": denial.code,
            "principal": denial.principal or "-",
            "peer": denial.peer,
            "reason": denial.reason,
        },
    )
    if on_denied is not None:
        try:
            on_denied(denial)
        except Exception:
            log.error("could not report a refused call", exc_info=True, extra={"method": denial.method})
    context.abort(getattr(grpc.StatusCode, denial.code), denial.reason)


def _certificate_cn(context: grpc.ServicerContext) -> str:
    """The common name of the client's certificate; only present when the server verified it (mutual TLS)."""
    # types-grpcio declares auth_context() as Mapping[str, bytes]; grpc gives a list of values for each key.
    auth_context = cast(Mapping[str, Sequence[bytes]], context.auth_context() or {})
    names = auth_context.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else ""


class _ClientToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to each call that does not carry its own."""

    def __init__(self, token: str) -> None:
        self._entry = (auth.AUTHORIZATION_KEY, f"Bearer {token}")

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if any(key == auth.AUTHORIZATION_KEY for key, _ in metadata):
            return details
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._entry],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )


# --- limits --------------------------------------------------------------------------------------------------------


class _FieldLimits(grpc.ServerInterceptor):
    """Parses each request itself and refuses one that does not parse, or is over the field limits of ``limits.py``,
    with INVALID_ARGUMENT naming the field, after reporting the refusal; health and reflection are not checked (their
    requests are the protocol's own). Left to grpcio, a request that does not parse is answered INTERNAL, which tells
    the caller the server failed, not that the request was wrong.

    Inside ``_ServerAuth``, so that a refusal names the caller it admitted, and outside ``_StreamLimits``, so that a
    refused request never takes a stream slot. Like the access decision, the check runs in the handler, on a worker
    thread.
    """

    def __init__(self, on_denied: Callable[[auth.Denial], None] | None) -> None:
        self._on_denied = on_denied

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or auth.is_open(details.method):
            return handler
        parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda data: data)
        check = functools.partial(
            self._checked, method=details.method, streaming=handler.request_streaming, parse=parse
        )
        return _wrapped(handler, check, check, raw_requests=True)

    def _checked(self, behavior: Behavior, method: str, streaming: bool, parse: Callable[[bytes], Any]) -> Behavior:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if streaming:
                return behavior(self._checked_requests(request, method, context, parse), context)
            return behavior(self._check(request, method, context, parse), context)

        return checked

    def _checked_requests(
        self, requests: Iterator[bytes], method: str, context: grpc.ServicerContext, parse: Callable[[bytes], Any]
    ) -> Iterator[Any]:
        for request in requests:
            yield self._check(request, method, context, parse)

    def _check(self, data: bytes, method: str, context: grpc.ServicerContext, parse: Callable[[bytes], Any]) -> Any:
        """The request parsed from ``data``; refuses the call when it does not parse or is over a field limit."""
        try:
            request = parse(data)
        except DecodeError as error:
            unparsed = f"the request is not a valid message of this method: {error}"
            _refuse(_denial("INVALID_ARGUMENT", method, unparsed, context), context, self._on_denied)
        if (over := limits.violation(request)) is not None:
            _refuse(_denial("INVALID_ARGUMENT", method, over, context), context, self._on_denied)
        return request


class _StreamLimits(grpc.ServerInterceptor):
    """Admits every stream through the ``StreamGate`` (RESOURCE_EXHAUSTED, reported, when its pool is full), tells
    the gate of each message either way (the idle limit) and frees the slot when the stream ends. Innermost."""

    def __init__(self, gate: StreamGate, on_denied: Callable[[auth.Denial], None] | None) -> None:
        self._gate = gate
        self._on_denied = on_denied

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method, request_streaming = details.method, handler.request_streaming
        return _wrapped(
            handler,
            lambda behavior: self._gated_unary(behavior, method, request_streaming),
            lambda behavior: self._gated_stream(behavior, method, request_streaming),
        )

    def _admit(self, method: str, context: grpc.ServicerContext, threaded: bool) -> OpenStream:
        try:
            return self._gate.enter(method, context, threaded=threaded, open_method=auth.is_open(method))
        except StreamsExhausted as full:
            _refuse(_denial("RESOURCE_EXHAUSTED", method, str(full), context), context, self._on_denied)
            raise  # unreachable: _refuse aborts

    def _gated_unary(self, behavior: Behavior, method: str, request_streaming: bool) -> Behavior:
        """A request stream with one response."""

        def gated(request: Any, context: grpc.ServicerContext) -> Any:
            stream = self._admit(method, context, threaded=True)
            try:
                return behavior(_noting(request, stream) if request_streaming else request, context)
            finally:
                self._gate.leave(stream)

        return gated

    def _gated_stream(self, behavior: Behavior, method: str, request_streaming: bool) -> Behavior:
        if getattr(behavior, "experimental_non_blocking", False):
            return self._gated_callback(behavior, method)

        def gated(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            stream = self._admit(method, context, threaded=True)
            # The slot is freed when this generator ends, i.e. when the thread it holds is free again (the server
            # drops the response iterator when the call ends, which closes it).
            try:
                for response in behavior(_noting(request, stream) if request_streaming else request, context):
                    stream.touch()
                    yield response
            finally:
                self._gate.leave(stream)

        return gated

    def _gated_callback(self, behavior: Any, method: str) -> Callable[..., Any]:
        """A stream answered through a callback (health Watch): it holds no thread, only a slot until it ends."""

        def gated(request: Any, context: grpc.ServicerContext, send_response_callback: Callable[[Any], None]) -> Any:
            stream = self._admit(method, context, threaded=False)
            if not context.add_callback(lambda: self._gate.leave(stream)):
                self._gate.leave(stream)  # the call has already ended

            def send(response: Any) -> None:
                stream.touch()
                send_response_callback(response)

            return behavior(request, context, send_response_callback=send)

        gated.experimental_non_blocking = True  # type: ignore[attr-defined]
        pool = getattr(behavior, "experimental_thread_pool", None)
        gated.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return gated


def _denial(code: auth.RefusalCode, method: str, reason: str, context: grpc.ServicerContext) -> auth.Denial:
    """A refusal by the limits, naming the caller the access policy admitted (none for open methods)."""
    caller = auth.current_caller()
    return auth.Denial(code, caller.principal if caller else "", method, reason, context.peer() or "")


def _noting(requests: Iterator[Any], stream: OpenStream) -> Iterator[Any]:
    """A request stream whose every message counts as traffic for the idle limit."""
    for request in requests:
        stream.touch()
        yield request
