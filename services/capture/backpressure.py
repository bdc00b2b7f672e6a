"""Backpressure for capture: CCTV frames are dropped, and counted, rather than queued without bound (docs/cctv.md).

Two bounds, checked for every frame:

- **The consumers' lag.** While the detection consumer group lags more than ``backpressure_max_lag_frames`` records on
  the frames topic, CCTV frames are dropped before they are even encoded: a live camera keeps its pace and the
  pipeline sees the freshest frames once it catches up, instead of a queue of stale ones. The lag is what
  ``sightline ops status`` shows (common/lag.py: high watermark minus the group's committed offset, right on Tansu
  too); it is measured in the background at most every ``backpressure_refresh_s`` and only while frames are being
  captured, so a frame only reads a cached number. When the lag cannot be read, nothing is dropped for it.
- **The producer's buffer.** kafka-python's producer keeps records until the broker acknowledges them, with no limit
  of its own, so a dead broker would grow memory frame by frame. The bytes handed to the producer and not yet
  acknowledged (or failed) are bounded by ``publish_buffer_bytes``: a CCTV frame that finds no room is dropped.

E-channel frames are never dropped: one that finds no room waits up to ``publish_timeout_s`` and then fails with
``BrokerUnavailable`` (the gate must know its frame did not go out). Every drop is counted in
``sightline_frames_dropped_total{service, source, reason}`` and in the Ingest call's ``frames_dropped``; one log line
every few seconds at most says how many frames of which source were dropped and why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from sightline.capture.settings import CaptureSettings
from sightline.common import telemetry
from sightline.common.config import KafkaSettings
from sightline.common.lag import service_lags
from sightline.common.rpc import Unavailable
from sightline.common.topics import FRAMES
from sightline.v1 import types_pb2

log = logging.getLogger(__name__)

SERVICE = "capture"
LOG_EVERY_S = 5.0
FIRST_MEASUREMENT_WAIT_S = 2.0  # the first frame waits this long at most for a first lag figure
LAG_TIMEOUT_S = 5.0
LAGGING = "consumers_lagging"
PRODUCER_FULL = "producer_buffer_full"
BROKER_UNAVAILABLE = "broker_unavailable"


class FrameDropped(Exception):
    """A CCTV frame not published because of backpressure; ``reason`` is the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerUnavailable(Unavailable):
    """An e-channel frame could not be handed to the producer in time (the broker is down or far behind)."""


def frames_lag(kafka: KafkaSettings) -> int | None:
    """Records waiting on the frames topic for its slowest consumer group; None when no group's lag is readable."""
    lags = service_lags(kafka, FRAMES.consumers, timeout_s=LAG_TIMEOUT_S)
    readable = [lag.total for lag in lags.values() if lag.error is None]
    return max(readable, default=None)


class ConsumerLag:
    """A lag figure refreshed in the background, at most every ``refresh_s`` and only while someone reads it."""

    def __init__(self, measure: Callable[[], int | None], refresh_s: float) -> None:
        self._measure = measure
        self.refresh_s = refresh_s
        self.stale_after_s = max(10 * refresh_s, 5.0)  # an old figure says nothing about now
        self._value: int | None = None
        self._measured_at = 0.0
        self._measured = threading.Event()
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_error_log = 0.0

    def current(self) -> int | None:
        """The latest figure (None: unknown); the first call waits briefly for the first measurement."""
        self._wanted.set()
        if self._thread is None:
            self._start()
            self._measured.wait(FIRST_MEASUREMENT_WAIT_S)
        if time.monotonic() - self._measured_at > self.stale_after_s:
            return None
        return self._value

    def close(self) -> None:
        self._closed.set()
        self._wanted.set()  # wake the thread so that it sees the close

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="frames-lag", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wanted.wait()  # sleeps while no frame is being captured
            if self._closed.is_set():
                return
            self._wanted.clear()
            self._refresh()
            self._closed.wait(self.refresh_s)

    def _refresh(self) -> None:
        try:
            self._value, self._measured_at = self._measure(), time.monotonic()
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the thread goes on and nothing is dropped for it
            if time.monotonic() - self._last_error_log >= LOG_EVERY_S:
                self._last_error_log = time.monotonic()
                log.warning(
                    "consumer lag unreadable: frames are not dropped for lag meanwhile", extra={"error": str(exc)}
                )
        finally:
            self._measured.set()


class InFlight:
    """Bytes handed to the producer and not yet acknowledged or failed, kept under a limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._bytes = 0
        self._room = threading.Condition()

    @property
    def bytes(self) -> int:
        return self._bytes

    def reserve(self, size: int, wait_s: float) -> bool:
        """Take ``size`` bytes of the budget, waiting up to ``wait_s`` for room; False when there was none.

        A record larger than the whole budget still goes when nothing else is in flight, rather than never.
        """

        def fits() -> bool:
            return self._bytes == 0 or self._bytes + size <= self.limit_bytes

        with self._room:
            if not self._room.wait_for(fits, timeout=wait_s):
                return False
            self._bytes += size
            return True

    def release(self, size: int) -> None:
        with self._room:
            self._bytes -= size
            self._room.notify_all()


class Backpressure:
    """Decides, per frame, whether it may be published; counts and reports what is dropped."""

    def __init__(
        self, settings: CaptureSettings, kafka: KafkaSettings, measure: Callable[[], int | None] | None = None
    ) -> None:
        self.max_lag = settings.backpressure_max_lag_frames
        self.publish_timeout_s = settings.publish_timeout_s
        self.lag = ConsumerLag(measure or (lambda: frames_lag(kafka)), settings.backpressure_refresh_s)
        self.in_flight = InFlight(settings.publish_buffer_bytes)
        self._dropped_since_log: Counter[tuple[str, str]] = Counter()
        self._last_log = 0.0
        self._log_lock = threading.Lock()

    def admit(self, ref: types_pb2.FrameRef) -> None:
        """Raise FrameDropped for a CCTV frame while the consumers lag too far behind."""
        if is_droppable(ref) and self.max_lag:
            lag = self.lag.current()
            if lag is not None and lag > self.max_lag:
                raise FrameDropped(LAGGING)

    def reserve(self, ref: types_pb2.FrameRef, size: int) -> None:
        """Room in the producer's buffer for one frame: a CCTV frame gets it now or is dropped (FrameDropped); an
        e-channel frame waits up to ``publish_timeout_s`` (then BrokerUnavailable). Release it when the send ends."""
        if is_droppable(ref):
            if not self.in_flight.reserve(size, wait_s=0):
                raise FrameDropped(PRODUCER_FULL)
        elif not self.in_flight.reserve(size, wait_s=self.publish_timeout_s):
            raise BrokerUnavailable(
                f"the producer's buffer stayed full for {self.publish_timeout_s:g} s: is the broker reachable?"
            )

    def release(self, size: int) -> None:
        self.in_flight.release(size)

    def unavailable(self, ref: types_pb2.FrameRef) -> Exception:
        """What to raise when the producer could not take a frame in time: a CCTV frame is dropped, an e-channel one
        fails."""
        if is_droppable(ref):
            return FrameDropped(BROKER_UNAVAILABLE)
        return BrokerUnavailable(f"the broker did not answer within {self.publish_timeout_s:g} s")

    def count(self, source_id: str, reason: str) -> None:
        """Count one dropped frame; log what was dropped at most every few seconds."""
        telemetry.FRAMES_DROPPED.labels(SERVICE, source_id, reason).inc()
        with self._log_lock:
            self._dropped_since_log[(source_id, reason)] += 1
            if time.monotonic() - self._last_log < LOG_EVERY_S:
                return
            self._last_log = time.monotonic()
            dropped = {f"{source}/{why}": n for (source, why), n in sorted(self._dropped_since_log.items())}
            self._dropped_since_log.clear()
        log.warning(
            "CCTV frames dropped (backpressure)",
            extra={
                "dropped": dropped,
                "lag": self.lag.current(),
                "max_lag": self.max_lag,
                "in_flight_bytes": self.in_flight.bytes,
                "buffer_bytes": self.in_flight.limit_bytes,
            },
        )

    def close(self) -> None:
        self.lag.close()


def is_droppable(ref: types_pb2.FrameRef) -> bool:
    """CCTV frames may be dropped under load; e-channel frames never are."""
    return ref.purpose != types_pb2.PURPOSE_ECHANNEL
