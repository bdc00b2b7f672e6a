"""gRPC plumbing shared by every server and client: the server with health and reflection, channels, and errors.

Every Sightline server serves the standard gRPC health protocol (so Kubernetes probes are plain ``grpc:`` probes and
``sightline status`` can ask any process) and server reflection (so ``grpcurl`` works without the protos).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
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
    """An insecure channel with Sightline's message size limits."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def check_health(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The health status of a server as a name ("SERVING", ...), or "UNREACHABLE"."""
    with channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
