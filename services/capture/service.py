"""Capture service: reads image folders, video files and RTSP streams, samples frames, publishes them to Kafka.

Frames are keyed by source id, so per-source order holds through every stage. CCTV frames are dropped, and counted,
while the consumers lag or the producer's buffer is full: never queued without bound (``backpressure.py``). Request
path: ``CaptureService.Ingest`` streams progress while a source is read (what ``sightline run`` uses); sources
configured in ``SIGHTLINE_CAPTURE_SOURCES`` are ingested continuously from start-up, reopened with capped backoff
while they are down. Both pass the source policy first (``source_policy.py``): a source it refuses, or one that cannot
be opened, fails the Ingest call with INVALID_ARGUMENT before any frame is published. Sources are named by their
redacted form everywhere (logs, errors, dead letters), never with the credentials a camera URL may carry.

Each frame starts its own trace: a root span (frame and source ids as attributes, never image data) whose context goes
into the frame record's headers, and on to every record the stages derive from it (see common/tracing.py). Beside it
goes the frame's capture time (``sightline-captured-at``), from which each stage measures its end-to-end latency
(common/stage.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import grpc
from kafka.errors import KafkaTimeoutError
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind

from sightline.capture.backpressure import Backpressure, FrameDropped
from sightline.capture.kiosk.kiosk import Kiosk
from sightline.capture.kiosk.servicer import KioskServicer
from sightline.capture.settings import CaptureSettings
from sightline.capture.source_policy import Source, SourceError, SourcePolicy, SourceRefused
from sightline.capture.sources import RawFrame, open_vetted, quiet_native_logs, source_id_for
from sightline.common import codec, telemetry, tracing
from sightline.common.audit import AuditLog
from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.images import ImageError, downscale_to, encode_jpeg
from sightline.common.rpc import InvalidInput, rpc_errors, stream_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import StageError, captured_at_header, source_dead_letter
from sightline.common.topics import DEADLETTER, FRAMES
from sightline.common.transient import Backoff
from sightline.v1 import capture_pb2, capture_pb2_grpc, events_pb2, types_pb2

SERVICE = "capture"
PROGRESS_EVERY_S = 0.25
# The sampling rates a request may ask for: one frame every 1000 s of media time at the slowest (slower would pace a
# folder's frames days apart, holding the call), 1000 per second at the fastest (above any camera's rate).
MIN_FPS, MAX_FPS = 0.001, 1000.0
PACING_CHECK_S = 0.5  # while pacing a file source, how often to check that the caller is still there
log = logging.getLogger(__name__)


class Capture:
    def __init__(self, settings: CaptureSettings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self._max_bytes = kafka.max_message_bytes - 64 * 1024  # room for the event's other fields
        self.producer = make_producer(kafka, max_block_ms=int(settings.publish_timeout_s * 1000))
        self.backpressure = Backpressure(settings, kafka)
        self.policy = SourcePolicy.from_settings(settings, max_image_bytes=self._max_bytes)

    def ingest(
        self, request: capture_pb2.IngestRequest, active: Callable[[], bool] = lambda: True
    ) -> Iterator[capture_pb2.IngestResponse]:
        """Vet and open the source, then read it and publish its frames; the iterator yields progress, the last one
        with done=True. A source that is refused or cannot be opened raises InvalidInput here, before any frame."""
        if not request.source_uri:
            raise InvalidInput("source_uri is empty")
        fps = request.fps or self.settings.default_fps
        if not MIN_FPS <= fps <= MAX_FPS:  # also NaN; a tiny rate would pace a folder's frames days apart
            raise InvalidInput(f"fps must be from {MIN_FPS} to {MAX_FPS:g} (0: the service's default), not {fps:g}")
        try:
            source, frames = self.open(request.source_uri, fps)
        except SourceRefused as exc:
            log.warning(
                "source refused by the source policy",  # a probe, perhaps: worth seeing in the log
                extra={"source": request.source_id or source_id_for(request.source_uri), "error": str(exc)},
            )
            raise InvalidInput(str(exc)) from None
        except SourceError as exc:
            raise InvalidInput(str(exc)) from None
        return self._stream(request, source, frames, fps, active)

    def open(self, uri: str, fps: float) -> tuple[Source, Iterator[RawFrame]]:
        """The vetted source and its frames; raises SourceRefused or SourceUnavailable (never with credentials)."""
        source = self.policy.vet(uri)
        return source, open_vetted(source, fps, self.policy, self.settings.stream_timeout_s)

    def _stream(
        self,
        request: capture_pb2.IngestRequest,
        source: Source,
        frames: Iterator[RawFrame],
        fps: float,
        active: Callable[[], bool],
    ) -> Iterator[capture_pb2.IngestResponse]:
        source_id = request.source_id or source_id_for(request.source_uri)
        run = uuid.uuid4().hex[:8]
        progress = capture_pb2.IngestResponse(source_id=source_id)
        last_report, started = 0.0, time.monotonic()
        for raw in frames:
            if not active() or (request.max_frames and progress.frames_read >= request.max_frames):
                break
            if not self._pace(request, source, raw, started, fps, active):
                break
            progress.frames_read += 1
            ref = self._frame_ref(request, source_id, run, progress.frames_read)
            try:
                published = self._publish(raw, ref, source.display)
            except FrameDropped as dropped:
                self.backpressure.count(source_id, dropped.reason)
                progress.frames_dropped += 1
            else:
                if published:
                    progress.frames_published += 1
                    progress.last_frame_id = ref.frame_id
                else:
                    progress.frames_failed += 1
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                yield progress
        self._flush(source_id)
        progress.done = True
        yield progress

    def close(self) -> None:
        """Stop measuring lag and close the producer, giving the broker a few seconds for what is in flight."""
        self.backpressure.close()
        try:
            self.producer.close(timeout=self.settings.publish_timeout_s)
        except KafkaTimeoutError:  # a dead broker: what it never acknowledged is lost, say so rather than crash
            log.warning(
                "frames not acknowledged by the broker at shutdown",
                extra={"in_flight_bytes": self.backpressure.in_flight.bytes},
            )

    def _flush(self, source_id: str) -> None:
        """Wait for the broker to acknowledge what was sent, but not forever: the broker may be down."""
        try:
            self.producer.flush(timeout=self.settings.publish_timeout_s)
        except KafkaTimeoutError:
            log.warning(
                "frames not yet acknowledged by the broker at the end of the source",
                extra={"source": source_id, "in_flight_bytes": self.backpressure.in_flight.bytes},
            )

    def _pace(
        self,
        request: capture_pb2.IngestRequest,
        source: Source,
        raw: RawFrame,
        started: float,
        fps: float,
        active: Callable[[], bool],
    ) -> bool:
        """Publish folder and file frames at the sampling rate (live streams pace themselves). False when the call
        ended while waiting: a caller that gave up must not hold a worker thread until the frame is due."""
        if request.no_pacing or source.live:
            return True
        due = started + (raw.media_time_s if raw.pixels is not None else raw.media_time_s / fps)
        while (delay := due - time.monotonic()) > 0:
            if not active():
                return False
            time.sleep(min(delay, PACING_CHECK_S))
        return True

    @staticmethod
    def _frame_ref(request: capture_pb2.IngestRequest, source_id: str, run: str, sequence: int) -> types_pb2.FrameRef:
        return types_pb2.FrameRef(
            frame_id=f"{source_id}:{run}:{sequence}",
            source_id=source_id,
            sequence=sequence,
            captured_at=codec.now(),
            purpose=request.purpose or types_pb2.PURPOSE_CCTV,
            claim_subject_id=request.claim_subject_id,
            watchlists=list(request.watchlists),
        )

    def publish_frame(self, raw: RawFrame, ref: types_pb2.FrameRef, origin: str) -> bool:
        """Publish one frame of a gate session (capture/kiosk/kiosk.py): traced and dead-lettered like any, never
        dropped."""
        return self._publish(raw, ref, origin)

    def _publish(self, raw: RawFrame, ref: types_pb2.FrameRef, origin: str) -> bool:
        """Publish one frame; False when it was dead-lettered. Raises FrameDropped for a CCTV frame that backpressure
        drops, BrokerUnavailable for an e-channel frame the producer could not take in time."""
        self.backpressure.admit(ref)  # before encoding: a dropped frame costs nothing
        with _frame_span(ref):
            try:
                image, media_type = self._encode(raw, ref.purpose)
            except (ImageError, StageError) as exc:
                self._dead_letter(ref, origin, raw, exc)
                return False
            event = events_pb2.FrameCaptured(frame=ref, image=image, media_type=media_type)
            self._send(ref, event.SerializeToString())
        telemetry.EVENTS_PUBLISHED.labels(SERVICE, FRAMES.name).inc()
        return True

    def _send(self, ref: types_pb2.FrameRef, value: bytes) -> None:
        """Hand the frame to the producer, within the bound on bytes not yet acknowledged (backpressure.py)."""
        self.backpressure.reserve(ref, len(value))
        try:
            future = self.producer.send(
                FRAMES.name, key=ref.source_id.encode(), value=value, headers=_frame_headers(ref)
            )
        except KafkaTimeoutError:  # no metadata for the topic within publish_timeout_s: the broker is not answering
            self.backpressure.release(len(value))
            raise self.backpressure.unavailable(ref) from None
        except BaseException:  # any other refusal (too large, producer closed): the bytes never went out
            self.backpressure.release(len(value))
            raise
        future.add_both(lambda _outcome: self.backpressure.release(len(value)))

    def _encode(self, raw: RawFrame, purpose: int = types_pb2.PURPOSE_UNSPECIFIED) -> tuple[bytes, str]:
        """The frame's bytes and media type: a file's own, or decoded pixels as JPEG at the purpose's quality."""
        if raw.error:
            raise StageError(raw.reason, raw.error)
        if raw.pixels is not None:
            pixels = downscale_to(raw.pixels, self.settings.max_frame_side)
            echannel = purpose == types_pb2.PURPOSE_ECHANNEL  # a 1:1 check on few frames: the higher quality
            quality = self.settings.echannel_jpeg_quality if echannel else self.settings.jpeg_quality
            return encode_jpeg(pixels, quality), "image/jpeg"
        assert raw.encoded is not None
        if len(raw.encoded) > self._max_bytes:
            raise StageError(
                "frame_too_large", f"{raw.name} is {len(raw.encoded)} bytes; the limit is {self._max_bytes}"
            )
        return raw.encoded, raw.media_type

    def _dead_letter(self, ref: types_pb2.FrameRef, origin: str, raw: RawFrame, error: Exception) -> None:
        """Dead-letter a frame capture could not publish, referenced by its source (``origin``, redacted) and
        sequence. The record never carries the frame's bytes (capture has no event to copy): a file that was withheld
        is described by its size and digest only."""
        key = ref.source_id.encode()
        record = source_dead_letter(
            SERVICE,
            error,
            source=origin,
            key=key,
            sequence=ref.sequence,
            frame_id=ref.frame_id,
            withheld=(raw.size, raw.sha256) if raw.size else None,
        )
        self.producer.send(DEADLETTER.name, key=key, value=record.SerializeToString(), headers=_frame_headers(ref))
        telemetry.EVENTS_DEADLETTERED.labels(SERVICE, record.reason).inc()
        log.warning("frame not published", extra={"reason": record.reason, "frame_id": ref.frame_id})

    def run_configured_sources(self, stop: threading.Event) -> None:
        """Ingest each configured source in its own thread, reopening it when it ends or is down (cameras drop out)."""
        for uri in self.settings.sources:
            name = f"source-{source_id_for(uri)}"  # thread names reach logs: never the URI (it may hold credentials)
            threading.Thread(target=self._follow, args=(uri, stop), daemon=True, name=name).start()

    def _follow(self, uri: str, stop: threading.Event) -> None:
        """Keep one configured source flowing: reopen it after it ends, retry with capped backoff while it is down,
        give up only when the policy refuses it (a configuration change, hence a restart, is needed then)."""
        request = capture_pb2.IngestRequest(source_uri=uri, purpose=types_pb2.PURPOSE_CCTV)
        source_id, backoff, failures = source_id_for(uri), self._reconnect_backoff(), 0
        while not stop.is_set():
            try:
                source, frames = self.open(uri, self.settings.default_fps)
            except SourceRefused as exc:
                log.error(
                    "configured source refused by the source policy: not opened",
                    extra={"source": source_id, "error": str(exc)},
                )
                return
            except SourceError as exc:
                failures += 1
                self._source_down(source_id, str(exc), failures, backoff.delay(failures))
            else:
                frames_read = self._read_configured(request, source, frames, stop)
                failures = 0 if frames_read else failures + 1  # a stream that opens but gives nothing is down
                if failures:
                    self._source_down(source_id, "no frames", failures, backoff.delay(failures))
            stop.wait(backoff.delay(failures) if failures else self.settings.reconnect_delay_s)

    def _read_configured(
        self, request: capture_pb2.IngestRequest, source: Source, frames: Iterator[RawFrame], stop: threading.Event
    ) -> int:
        """Read a configured source to its end; the frames read. Whatever fails on the way (the broker, a decoder)
        ends this attempt only: the source is reopened, never left behind by a dead thread."""
        final = capture_pb2.IngestResponse()
        try:
            for progress in self._stream(request, source, frames, self.settings.default_fps, lambda: not stop.is_set()):
                final = progress
        except Exception:
            log.warning(
                "configured source failed while reading",
                exc_info=True,
                extra={"source": source_id_for(request.source_uri)},
            )
        return final.frames_read

    def _reconnect_backoff(self) -> Backoff:
        return Backoff(
            initial_s=self.settings.reconnect_delay_s,
            max_s=max(self.settings.reconnect_delay_s, self.settings.reconnect_max_delay_s),
        )

    @staticmethod
    def _source_down(source_id: str, error: str, attempt: int, retry_in_s: float) -> None:
        telemetry.EVENTS_FAILED.labels(SERVICE, "source_unavailable").inc()
        log.warning(
            "configured source unavailable; retrying",
            extra={"source": source_id, "error": error, "attempt": attempt, "retry_in_s": round(retry_in_s, 3)},
        )


def _frame_headers(ref: types_pb2.FrameRef) -> tracing.KafkaHeaders:
    """The headers of a frame's records: the frame's trace context (its span is current) and its capture time, which
    every stage copies on and observes its end-to-end latency from (``CAPTURED_AT_HEADER``, common/stage.py)."""
    return [*tracing.kafka_headers(), captured_at_header(ref.captured_at)]


def _frame_span(ref: types_pb2.FrameRef) -> AbstractContextManager[trace.Span]:
    """The root span of one frame's trace, current while it is published; linked to the Ingest call, if any.

    A root rather than a child of the Ingest call: one trace per frame keeps a long video's trace small, and frames
    from configured sources (no call at all) look the same.
    """
    request = trace.get_current_span().get_span_context()
    return tracing.tracer.start_as_current_span(
        SERVICE,
        context=Context(),
        kind=SpanKind.PRODUCER,
        links=[Link(request)] if request.is_valid else None,
        attributes={
            "sightline.frame_id": ref.frame_id,
            "sightline.source_id": ref.source_id,
            "messaging.system": "kafka",
            "messaging.destination.name": FRAMES.name,
        },
    )


class CaptureServicer(capture_pb2_grpc.CaptureServiceServicer):
    def __init__(self, capture: Capture) -> None:
        self._capture = capture

    @rpc_errors
    def Ingest(
        self, request: capture_pb2.IngestRequest, context: grpc.ServicerContext
    ) -> Iterator[capture_pb2.IngestResponse]:
        # Validate before streaming, so a bad source is reported as INVALID_ARGUMENT rather than a broken stream.
        stream = self._capture.ingest(request, active=context.is_active)
        first = next(stream)
        return stream_errors(_chain(first, stream), context)  # e.g. the broker lost while an e-channel source streams


def _chain(
    first: capture_pb2.IngestResponse, rest: Iterator[capture_pb2.IngestResponse]
) -> Iterator[capture_pb2.IngestResponse]:
    yield first
    yield from rest


def main() -> None:
    settings = CaptureSettings()
    kafka = KafkaSettings()
    # Before the configured sources start: their warnings must reach the log, and their frames must start traces.
    # run_service's own calls then find both done.
    telemetry.configure_logging(SERVICE, settings.log_level, settings.log_json)
    quiet_native_logs()
    tracing.setup_tracing(SERVICE)
    audit = AuditLog.open_if_configured()  # where refused calls are audited; None: they are logged only
    capture = Capture(settings, kafka)
    stop = threading.Event()
    capture.run_configured_sources(stop)
    kiosk = Kiosk(capture, settings, kafka)  # opens the gate session store (database_url)
    kiosk.start()  # resumes the store's open sessions
    servicers = [
        Servicer.of(CaptureServicer(capture)),
        Servicer.of(KioskServicer(kiosk)),
    ]

    def close() -> None:
        stop.set()
        kiosk.close()  # open sessions stay in the store; queued template deletions finish: before the producer closes
        capture.close()
        if audit is not None:
            audit.close()

    run_service(SERVICE, settings, kafka, servicers, on_stop=close, audit=audit)
