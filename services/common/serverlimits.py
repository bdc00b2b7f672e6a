"""How much of a gRPC server its calls may hold, so that idle streams can never starve health probes or the APIs.

(What one request may *contain*, its strings and lists, is ``limits.py``; this module bounds what calls *hold*.)

The sync server runs each call on a thread of a fixed pool (``grpc_workers``). A blocking stream (reflection, capture
Ingest, kiosk WatchSession) holds its thread for as long as it is open. Unbounded, a client opening idle streams could
take every thread, and health Check would queue behind them until the probe failed. So ``StreamGate`` keeps three
pools of stream slots; a stream that finds its pool full is refused with RESOURCE_EXHAUSTED:

- **threaded**: streams that hold a worker thread, at most ``max_streams`` (``grpc_reserved_workers`` fewer than the
  threads), so unary calls (health Check, the APIs) always have threads of their own;
- **open**: of those, the streams of methods anyone may call without credentials (reflection), at most
  ``max_open_streams``, so callers without a token cannot take the slots of the authenticated streams;
- **watch**: streams that hold no thread (health Watch answers through callbacks), at most ``max_watchers``, in a pool
  of their own: they cost memory only, so they must neither be unbounded nor take a threaded stream's slot.

A stream without a message either way for ``stream_idle_s`` is cancelled (the client sees CANCELLED and may reopen it),
which frees its slot. ``maximum_concurrent_rpcs`` bounds the calls running on or waiting for a thread (a stream that
answers through callbacks, like health Watch, stops counting once its handler has returned); more are refused with
RESOURCE_EXHAUSTED by gRPC itself. Connection options: a connection without calls for ``stream_idle_s`` is closed;
keepalive pings find peers that vanished (their streams are then cancelled and their slots freed); with
``max_connection_age_s`` set, an older connection is asked to reconnect (GOAWAY) and closed ``stream_idle_s`` later.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

RESERVED_WORKERS = 2
RPCS_PER_WORKER = 4  # maximum_concurrent_rpcs, unless set: a short queue per thread, not an unbounded one
OPEN_STREAM_SHARE = 3  # open (credential-less) streams may take one in this many threaded slots, at least one
MAX_WATCHERS = 100  # health Watch streams: each costs a callback and a little memory, no thread
STREAM_IDLE_S = 300.0
MAX_CONNECTION_AGE_S = 0.0  # off: a live camera's Ingest or a long video may stream for hours
KEEPALIVE_TIME_MS = 60_000  # ping a connection after a minute without traffic
KEEPALIVE_TIMEOUT_MS = 20_000  # and drop it when the ping is not answered in this time


class StreamsExhausted(Exception):
    """A stream's pool is full; the message says which (the same text every time, so refusals aggregate)."""


@dataclass(frozen=True)
class ServerLimits:
    """The bounds of one server; ``for_workers`` derives them from its thread count."""

    max_streams: int  # streams holding a worker thread
    max_concurrent_rpcs: int
    max_open_streams: int = 1  # of the threaded streams, those of methods open to callers without credentials
    max_watchers: int = MAX_WATCHERS  # streams that hold no thread (health Watch)
    stream_idle_s: float = STREAM_IDLE_S
    max_connection_age_s: float = MAX_CONNECTION_AGE_S  # 0: connections may live for ever

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_concurrent_rpcs", "max_open_streams", "max_watchers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def for_workers(
        cls,
        workers: int,
        reserved: int = RESERVED_WORKERS,
        max_concurrent_rpcs: int | None = None,
        stream_idle_s: float = STREAM_IDLE_S,
        max_connection_age_s: float = MAX_CONNECTION_AGE_S,
        max_watchers: int = MAX_WATCHERS,
    ) -> ServerLimits:
        """Streams get ``workers - reserved`` threads, at least one (then nothing is reserved: ``reserved`` should be
        below ``workers``), open streams a third of those; ``max_concurrent_rpcs`` defaults to ``RPCS_PER_WORKER`` per
        thread."""
        if workers <= reserved:
            log.warning(
                "gRPC: %d worker thread(s) leave none reserved for unary calls beside %d; one stream at a "
                "time is admitted",
                workers,
                reserved,
            )
        streams = max(1, workers - reserved)
        return cls(
            streams,
            max_concurrent_rpcs or RPCS_PER_WORKER * workers,
            max(1, streams // OPEN_STREAM_SHARE),
            max_watchers,
            stream_idle_s,
            max_connection_age_s,
        )

    def server_options(self) -> list[tuple[str, int]]:
        """The connection options of ``grpc.server`` that enforce these limits."""
        idle_ms = int(self.stream_idle_s * 1000)
        options = [
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection whose only stream is idle
        ]
        if self.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", idle_ms),
            ]
        return options


@dataclass(eq=False)
class OpenStream:
    """A stream a ``StreamGate`` admitted: ``touch`` on each message either way, ``StreamGate.leave`` at its end."""

    method: str
    context: grpc.ServicerContext
    slots: tuple[threading.BoundedSemaphore, ...]  # released when it leaves
    last_active: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    left: bool = False

    def touch(self) -> None:
        self.last_active = time.monotonic()


class StreamGate:
    """Admits streams into their pools (module docstring) and cancels those idle for ``stream_idle_s``; thread-safe.

    ``start`` runs the idle watchdog (one daemon thread), ``stop`` ends it.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self._idle_s = limits.stream_idle_s
        self._threaded = threading.BoundedSemaphore(limits.max_streams)
        self._open_slots = threading.BoundedSemaphore(limits.max_open_streams)
        self._watch = threading.BoundedSemaphore(limits.max_watchers)
        self._full = {
            self._threaded: f"all {limits.max_streams} streams this server runs at once are open; retry later",
            self._open_slots: f"all {limits.max_open_streams} reflection streams this server allows are open; "
            "retry later",
            self._watch: f"all {limits.max_watchers} health Watch streams this server allows are open; use "
            "health Check, or retry later",
        }
        self._open: set[OpenStream] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._cancel_idle, name="grpc-stream-idle", daemon=True)

    def enter(self, method: str, context: grpc.ServicerContext, *, threaded: bool, open_method: bool) -> OpenStream:
        """The admitted stream; raises ``StreamsExhausted`` when its pool is full.

        ``threaded``: the stream holds a worker thread while open; ``open_method``: anyone may call the method
        without credentials (health, reflection)."""
        if not threaded:
            pools = [self._watch]
        elif open_method:
            pools = [self._open_slots, self._threaded]
        else:
            pools = [self._threaded]
        taken: list[threading.BoundedSemaphore] = []
        for pool in pools:
            if not pool.acquire(blocking=False):
                for slot in taken:
                    slot.release()
                raise StreamsExhausted(self._full[pool])
            taken.append(pool)
        stream = OpenStream(method, context, tuple(taken))
        with self._lock:
            self._open.add(stream)
        return stream

    def leave(self, stream: OpenStream) -> None:
        """Free the stream's slots; a second call for the same stream does nothing."""
        with self._lock:
            if stream.left:
                return
            stream.left = True
            self._open.discard(stream)
        for slot in stream.slots:
            slot.release()

    def start(self) -> None:
        self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog.is_alive():
            self._watchdog.join()

    def _cancel_idle(self) -> None:
        # Checking a few times per idle period keeps the overshoot a fraction of it; a few seconds at most.
        while not self._stopping.wait(min(self._idle_s / 4, 5.0)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._open if not s.cancelled and now - s.last_active >= self._idle_s]
                for stream in idle:
                    stream.cancelled = True
            for stream in idle:
                log.info("cancelling an idle stream", extra={"method": stream.method, "idle_s": self._idle_s})
                stream.context.cancel()  # ends the call; the stream's handler then returns and leaves the gate
