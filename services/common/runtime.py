"""How a Sightline service process starts and stops: logging, metrics, gRPC server, and the faust worker.

A service module builds its settings, its gRPC servicers and (for stream services) its stages, and hands them to
``run_service``; everything a process must do the same way lives here once. The process stops cleanly on SIGTERM or
SIGINT: the health service reports NOT_SERVING, in-flight gRPC calls get a grace period, the faust worker commits.

The gRPC server is secured as the process's ``SIGHTLINE_AUTH_*`` and ``SIGHTLINE_TLS_*`` settings say (see
docs/security.md); a service with an audit log passes it, and refused calls are then audited as ACCESS_DENIED,
repeats aggregated (``denials.py``), as are calls refused by the server's limits: streams and concurrent calls
(``serverlimits.py``, settings ``SIGHTLINE_<SERVICE>_GRPC_*``) and over-long fields (``limits.py``).
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sightline.common import telemetry, tracing
from sightline.common.audit import AuditLog
from sightline.common.auth import AccessPolicy, AuthSettings
from sightline.common.config import KafkaSettings, ServiceSettings
from sightline.common.denials import DenialAudit
from sightline.common.rpc import GrpcServer, GrpcService, grpc_service
from sightline.common.serverlimits import ServerLimits
from sightline.common.stage import Stage
from sightline.common.stall import StallWatchdog
from sightline.common.tls import TlsSettings, server_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Servicer:
    """A gRPC servicer and the service of the protos it implements, e.g. ``Servicer.of(GalleryServicer(...))``.

    The service's full name and registration function come from the generated code (``rpc.grpc_service``), so a
    main() names neither; ``of`` raises TypeError at once for an object that implements no generated service.
    """

    impl: Any
    service: GrpcService

    @classmethod
    def of(cls, impl: Any) -> Servicer:
        return cls(impl, grpc_service(impl))


def run_service(
    name: str,
    settings: ServiceSettings,
    kafka: KafkaSettings,
    servicers: Sequence[Servicer] = (),
    stages: Sequence[Stage] = (),
    on_stop: Callable[[], None] | None = None,
    app_options: dict[str, Any] | None = None,
    audit: AuditLog | None = None,
    on_serving: Callable[[GrpcServer], None] | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT. With stages, a faust worker runs them; otherwise the gRPC server alone.

    With ``audit``, calls the access policy refuses are recorded in it (ACCESS_DENIED) as well as logged; the
    counts of repeated refusals still open are written after the server stops, before ``on_stop`` (which may close
    the log). ``on_serving(server)`` runs once the gRPC server has started, e.g. to tie its health to the service's
    own readiness (matching: ``Gallery.readiness``).
    """
    telemetry.configure_logging(name, settings.log_level, settings.log_json)
    tracing.setup_tracing(name)
    telemetry.start_metrics(settings.metrics_port)
    denials = DenialAudit(audit) if audit is not None else None
    server = GrpcServer(
        settings.grpc_host,
        settings.grpc_port,
        settings.grpc_workers,
        access=AccessPolicy.from_settings(AuthSettings()),
        on_denied=denials,
        credentials=server_credentials(TlsSettings()),
        limits=server_limits(settings),
    )
    for servicer in servicers:
        server.add(servicer.impl, servicer.service)
    log.info("starting", extra={"grpc_port": settings.grpc_port, "metrics_port": settings.metrics_port})
    try:
        if stages:
            _run_with_faust(name, kafka, stages, server, app_options or {}, on_serving)
        else:
            _start(server, on_serving)
            _wait_for_signal()
    finally:
        server.stop()
        if denials is not None:
            denials.close()
        if on_stop:
            on_stop()
        log.info("stopped")


def server_limits(settings: ServiceSettings) -> ServerLimits:
    """The gRPC server limits a service's settings ask for."""
    return ServerLimits.for_workers(
        settings.grpc_workers,
        settings.grpc_reserved_workers,
        settings.grpc_max_concurrent_rpcs,
        settings.grpc_stream_idle_s,
        settings.grpc_max_connection_age_s,
        settings.grpc_max_watch_streams,
    )


def _start(server: GrpcServer, on_serving: Callable[[GrpcServer], None] | None) -> None:
    server.start()
    if on_serving is not None:
        on_serving(server)


def _run_with_faust(
    name: str,
    kafka: KafkaSettings,
    stages: Sequence[Stage],
    server: GrpcServer,
    app_options: dict[str, Any],
    on_serving: Callable[[GrpcServer], None] | None = None,
) -> None:
    import faust

    from sightline.common.streams import faust_app

    # faust wants a data folder; a private temporary one keeps the working directory clean and works on a
    # read-only root filesystem (only /tmp is writable in the container).
    datadir = tempfile.mkdtemp(prefix=f"sightline-{name}-faust-")
    app = faust_app(name, kafka, datadir=datadir, **app_options)
    for stage in stages:
        stage.attach(app)

    async def _serving() -> None:
        _start(server, on_serving)

    app.task(_serving)  # faust's decorator, called plainly: it is untyped, and would make _serving untyped too
    watchdog = StallWatchdog(name, kafka, kafka.stall_exit_s).start() if kafka.stall_exit_s else None

    worker = faust.Worker(
        app, loglevel=logging.getLogger().level, override_logging=False, redirect_stdouts=False, quiet=True
    )
    worker.spinner = None  # the terminal spinner writes cursor escapes into the JSON log stream
    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass
    finally:
        if watchdog is not None:
            watchdog.stop()
        shutil.rmtree(datadir, ignore_errors=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
