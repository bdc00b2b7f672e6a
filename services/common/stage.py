"""One stream stage: consume a topic, process each event (or a batch), publish the results, dead-letter failures.

Every stream service (detection, embedding, matching, decision) is a ``Stage`` around its ``Processor``: one
method, ``process(events)``, that returns one result per input event, its outputs or the error it raised. A service
whose events are independent subclasses ``EventProcessor`` and writes ``process_event(event)`` only; embedding,
which batches its events into one model call, implements ``process`` itself. This module owns what every stage must
do the same way:

- Processing runs on a worker thread, so the event loop keeps heartbeating while a model runs.
- At-least-once delivery end to end, for kills and producer failures alike: an input event is acknowledged to faust
  (which is what lets its offset be committed) only once the broker has acknowledged every record sent for it, its
  outputs or its dead letter (``acks=all``, streams.py). A record the broker could not take in time is sent again;
  nothing is acknowledged in the meantime.
- A transient failure (a database or the broker not answering, transient.py) is not the input's fault: the input is
  processed again after a backoff, without limit, and never dead-lettered. An erasure notice is never dropped.
- A bad input never stops the stage: it is published to the dead-letter topic with the stage, a reason and a
  reference to the input (topic, partition, offset), counted in metrics, and the stage goes on. So is an input whose
  output is larger than the producer may send (``output_too_large``): none of its outputs is sent, so consumers
  never see half a result. One input's failure is its own: the other inputs of its batch are delivered.
- A dead letter carries the SHA-256 and size of the input, and a copy of it only when the input is the topic's own
  event type and, for frames, its image bytes start like an image: never bytes of unknown content. Capture, whose
  inputs are files and streams rather than records, dead-letters with ``source_dead_letter``: the same record, the
  source's redacted name in place of a topic.
- Each input event is processed in its own span, a child of the context in the input record's headers (see
  tracing.py); every record sent for that event, outputs and dead letters alike, carries that span's context, and
  the CloudEvents attributes of the event it carries (cloudevents.py: a replayed input's outputs have the same ids).
- End-to-end latency: capture puts each frame's capture time on its record, in the ``sightline-captured-at`` header
  (``CAPTURED_AT_HEADER``: epoch milliseconds, as ASCII digits). Every stage copies that header, beside the trace
  context, onto every record it sends for the input, so it travels frames -> faces -> embeddings -> matches ->
  decisions and alerts (and onto dead letters); and once the broker has acknowledged an input's outputs the stage
  observes ``sightline_capture_to_stage_seconds{service}`` (``telemetry.END_TO_END_LATENCY``). An input without the
  header (session events, erasure notices, records written before it existed) is not observed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sightline.common import cloudevents, codec, telemetry, tracing, transient
from sightline.common.topics import ALL_TOPICS, DEADLETTER, FRAMES, TopicSpec
from sightline.common.transient import Backoff
from sightline.v1 import events_pb2

log = logging.getLogger(__name__)

MAX_DEADLETTER_PAYLOAD = 1024 * 1024
# Room a dead letter keeps for its own fields (reason, error text, references) beside its copy of the payload.
_RECORD_ROOM = 64 * 1024
# The header with a frame's capture time (epoch milliseconds, ASCII digits), copied onto everything derived from it.
CAPTURED_AT_HEADER = "sightline-captured-at"
_MAX_CAPTURED_AT_DIGITS = 16  # epoch milliseconds have 13 digits until the year 2286: anything longer is not one


@dataclass(frozen=True)
class Output:
    """An event to publish: protobuf bytes on a topic, keyed by source id."""

    topic: TopicSpec
    key: bytes
    value: bytes


@dataclass(frozen=True)
class InputEvent:
    """What a stage's processor sees of one consumed record."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...] = ()  # the record's headers, as received (trace context among them)
    # This event's own span in this stage: current while the event is processed, so logs carry its trace id.
    span: trace.Span | None = field(default=None, compare=False, repr=False)


class StageError(Exception):
    """A failure to process one input that belongs in the dead-letter topic, with a machine-readable reason."""

    def __init__(self, reason: str, message: str, frame_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.frame_id = frame_id


class Processor(Protocol):
    """What a stage runs on its worker thread: a batch of input events in, one result per input out, in order.

    A result is the input's outputs (possibly none), or the error processing it raised: a ``StageError`` or
    ``codec.MalformedEvent`` (the input is dead-lettered with its reason), a transient error (``transient.py``: it is
    processed again) or anything else (dead-lettered as ``internal_error``). One input's error must not become the
    others': a processor that fails as a whole fails every input of the batch.
    """

    def process(self, events: Sequence[InputEvent]) -> list[list[Output] | BaseException]: ...


class EventProcessor(ABC):
    """A processor whose events are independent: ``process_event`` takes them one at a time, each with its span
    current (so its logs carry its own trace id, even in a batch) and its failure isolated to it."""

    @abstractmethod
    def process_event(self, event: InputEvent) -> list[Output]:
        """The outputs of one input event; raises when it cannot be processed (see ``Processor``)."""

    def process(self, events: Sequence[InputEvent]) -> list[list[Output] | BaseException]:
        results: list[list[Output] | BaseException] = []
        for event in events:
            try:
                with tracing.activated(event.span):
                    results.append(self.process_event(event))
            except Exception as exc:  # noqa: BLE001 - isolated per event, reported to the dead-letter topic
                results.append(exc)
        return results


def captured_at_header(stamp: Timestamp) -> tuple[str, bytes]:
    """The header capture puts on a frame record: its capture time, as ``CAPTURED_AT_HEADER`` carries it."""
    return CAPTURED_AT_HEADER, str(stamp.ToMilliseconds()).encode("ascii")


def captured_at(headers: Iterable[tuple[str, bytes]]) -> float | None:
    """The capture time (epoch seconds) in a record's headers; None when they carry none, or not a well-formed one."""
    value = _captured_at_value(headers)
    return int(value) / 1000 if value is not None else None


def _captured_at_value(headers: Iterable[tuple[str, bytes]]) -> bytes | None:
    """The first ``CAPTURED_AT_HEADER`` value, when it is one (digits, not too many): only such a value is copied on."""
    value = next((value for key, value in headers if key == CAPTURED_AT_HEADER), None)
    if isinstance(value, bytes) and 0 < len(value) <= _MAX_CAPTURED_AT_DIGITS and value.isdigit() and int(value):
        return value  # 0 is an unset capture time, not one of 1970
    return None


class _Stopping(BaseException):
    """The worker is stopping while an event waits for a retry: leave it unacknowledged, to be processed again.

    A BaseException, like asyncio's CancelledError, so that no ``except Exception`` on the way takes it for a failure.
    """


@dataclass(frozen=True)
class _Record:
    """One record to send for an input: an output, or the input's dead letter."""

    topic: str
    key: bytes
    value: bytes
    headers: tracing.KafkaHeaders
    dead_letter: bool = False


@dataclass
class Stage:
    """Binds a processor to an input topic on a faust app."""

    service: str
    input: TopicSpec
    outputs: Sequence[TopicSpec]
    processor: Processor
    max_batch: int = 1
    batch_wait_s: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)  # between retries of a transient failure
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    _app: Any = field(default=None, repr=False)
    _sinks: dict[str, Any] = field(default_factory=dict, repr=False)
    # The producer's limit on one record, read from the app in attach().
    _max_record_bytes: int = MAX_DEADLETTER_PAYLOAD + _RECORD_ROOM

    def attach(self, app: Any) -> None:
        """Declare the faust agent that runs this stage."""
        self._app = app
        self._max_record_bytes = int(app.conf.producer_max_request_size)
        source = app.topic(self.input.name, value_type=bytes, key_type=bytes)
        for spec in [*self.outputs, DEADLETTER]:
            self._sink(spec.name)

        async def agent(stream: Any) -> None:
            # noack_take, not take_events: take_events acks a batch when its generator is closed, including when the
            # stream stops (or the agent fails) in the middle of the batch, and faust then commits those offsets on
            # its way out. Here nothing is acked but by the line below, reached only once _handle has had every
            # record of the batch acknowledged by the broker; faust commits acked offsets only.
            batches = stream.noack_take(self.max_batch, within=self.batch_wait_s or 0.001)
            async for events in batches:
                try:
                    await self._handle(list(events))
                except _Stopping:
                    # Left unacknowledged, so never committed: replayed by whoever owns the partition next. (faust
                    # does not wait for them to finish either: stream_wait_empty is off, streams.py.)
                    await batches.aclose()
                    return
                for event in events:
                    await stream.ack(event)

        app.agent(source, name=f"sightline-{self.service}-stage")(agent)

    def _sink(self, name: str) -> Any:
        if name not in self._sinks:
            self._sinks[name] = self._app.topic(name, value_type=bytes, key_type=bytes)
        return self._sinks[name]

    async def _handle(self, events: list[Any]) -> None:
        """Process the batch and deliver what it gave; returns once the broker has acknowledged all of it."""
        inputs = [self._input_of(event) for event in events]
        try:
            with telemetry.timed(telemetry.STAGE_LATENCY, service=self.service, stage=self.service):
                results = await self._results(inputs)
            await self._deliver(inputs, results)
        finally:
            for item in inputs:
                item.span.end()  # type: ignore[union-attr]

    def _input_of(self, event: Any) -> InputEvent:
        """The event as the processor sees it, with its span: a child of the context in its headers."""
        message = event.message
        headers = tuple(message.headers or ())
        span = tracing.tracer.start_span(
            self.service,
            context=tracing.context_from_headers(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": message.topic,
                "messaging.destination.partition.id": str(message.partition),
                "messaging.kafka.offset": message.offset,
            },
        )
        return InputEvent(
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            headers=headers,
            span=span,
        )

    # -- processing, with transient failures retried ------------------------------------------------------------

    async def _results(self, inputs: list[InputEvent]) -> list[list[Output] | BaseException]:
        """Each input's outputs or error; inputs that failed transiently are processed again until they do not."""
        results = await self._run(inputs)
        attempt = 0
        while waiting := [i for i, result in enumerate(results) if _is_transient_failure(result)]:
            attempt += 1
            await self._pause("processing", results[waiting[0]], attempt, inputs[waiting[0]])  # type: ignore[arg-type]
            # Only the inputs still waiting, in their order: those of one source stay in order when published.
            for i, result in zip(waiting, await self._run([inputs[i] for i in waiting]), strict=True):
                results[i] = result
        return results

    async def _run(self, inputs: list[InputEvent]) -> list[list[Output] | BaseException]:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._process, inputs)
        except Exception as exc:  # noqa: BLE001 - a failed batch is each input's failure (retried if transient)
            return [exc] * len(inputs)
        if len(results) != len(inputs):  # a processor's bug must not pair outputs with the wrong inputs
            return [RuntimeError(f"{len(results)} results for {len(inputs)} inputs")] * len(inputs)
        return list(results)

    def _process(self, inputs: list[InputEvent]) -> list[list[Output] | BaseException]:
        # Runs on the worker thread, which does not inherit the event loop's context: a lone event's span is made
        # current here; in a batch, EventProcessor (or the batch processor) makes each event's span current in turn.
        with tracing.activated(inputs[0].span if len(inputs) == 1 else None):
            return self.processor.process(inputs)

    async def _pause(self, during: str, error: BaseException, attempt: int, item: InputEvent) -> None:
        """Log and count a retry of a transient failure, then wait the backoff (on the loop: heartbeats go on).

        Raises _Stopping when the worker is stopping: a retry must not hold up its shutdown for ever.
        """
        self._check_stopping()
        cause = transient.transient_cause(error) or error
        delay = self.backoff.delay(attempt)
        telemetry.STAGE_RETRIES.labels(self.service, type(cause).__name__).inc()
        with tracing.activated(item.span):
            log.warning(
                "transient failure; retrying",
                extra={
                    "during": during,
                    "error_type": type(cause).__name__,
                    "error": str(cause)[:200],
                    "attempt": attempt,
                    "retry_in_s": round(delay, 3),
                    "topic": item.topic,
                    "partition": item.partition,
                    "offset": item.offset,
                },
            )
        await asyncio.sleep(delay)
        self._check_stopping()

    def _check_stopping(self) -> None:
        if self._app is not None and self._app.should_stop:  # set as soon as the app begins to stop
            raise _Stopping()

    # -- delivery: nothing counts as done before the broker has acknowledged it -----------------------------------

    async def _deliver(self, inputs: list[InputEvent], results: list[list[Output] | BaseException]) -> None:
        plans = [self._records(item, result) for item, result in zip(inputs, results, strict=True)]
        # Everything is handed to the producer first, then awaited: the records of a batch travel together.
        started = [[await self._start(record) for record in records] for records in plans]
        for item, records, futures in zip(inputs, plans, started, strict=True):
            await self._confirm_input(item, records, futures)

    def _records(self, item: InputEvent, result: list[Output] | BaseException) -> list[_Record]:
        """What to send for one input: its outputs, or its dead letter (also when an output is too large to send)."""
        headers = _headers(item)
        if isinstance(result, BaseException):
            return [self._dead_letter(item, result, headers)]
        records = [_record(output.topic.name, output.key, output.value, headers) for output in result]
        for record in records:
            size = _record_size(record)
            if size > self._max_record_bytes:
                error = StageError(
                    "output_too_large",
                    f"an output for {record.topic} is {size} bytes, over the "
                    f"producer's limit of {self._max_record_bytes} (SIGHTLINE_KAFKA_MAX_MESSAGE_BYTES)",
                )
                return [self._dead_letter(item, error, headers)]  # none of its outputs: never half a result
        return records

    async def _start(self, record: _Record) -> asyncio.Future[Any]:
        """Hand a record to the producer; the future resolves when the broker has acknowledged it.

        This is what faust's ``Topic.send`` does, keeping the message future it makes: that future is the one faust
        fails with the delivery error, and awaiting it (not the producer's own) is what retrieves that error.
        """
        sink = self._sink(record.topic)
        # A fresh list per record: faust may add its own headers to the list it is given.
        message = sink.as_future_message(key=record.key, value=record.value, headers=list(record.headers))
        # Its outcome is read by _acknowledged; one left behind when the worker stops must not be reported unread.
        message.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            await sink.publish_message(message)
        except Exception as exc:  # noqa: BLE001 - refused before it left (e.g. no metadata in time): a failed send
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        return message  # type: ignore[no-any-return]

    async def _confirm_input(
        self, item: InputEvent, records: list[_Record], futures: list[asyncio.Future[Any]]
    ) -> None:
        if records and records[0].dead_letter:
            await self._confirm_dead_letter(item, records[0], futures[0])
            return
        refusals = [await self._confirm(item, record, future) for record, future in zip(records, futures, strict=True)]
        refused = next((error for error in refusals if error is not None), None)
        if refused is not None:
            # The broker refused an output for good (e.g. a topic limit below the producer's): the input is
            # dead-lettered. Outputs of it already delivered stay; on a correctly configured cluster this cannot occur.
            error = StageError("output_rejected", f"the broker refused an output: {type(refused).__name__}: {refused}")
            dead_letter = self._dead_letter(item, error, _headers(item))
            await self._confirm_dead_letter(item, dead_letter, await self._start(dead_letter))
            return
        for record in records:
            telemetry.EVENTS_PUBLISHED.labels(self.service, record.topic).inc()
        telemetry.EVENTS_PROCESSED.labels(self.service, item.topic).inc()
        since = captured_at(item.headers)
        if since is not None:  # a frame (or what was derived from one) at the end of this stage: delivered
            telemetry.END_TO_END_LATENCY.labels(self.service).observe(time.time() - since)

    async def _confirm(self, item: InputEvent, record: _Record, future: asyncio.Future[Any]) -> BaseException | None:
        """Wait for the broker's acknowledgement, sending again after each transient failure; the error if refused."""
        attempt = 0
        while True:
            try:
                await self._acknowledged(future)
                return None
            except Exception as exc:  # noqa: BLE001 - classified: transient is retried, anything else is a refusal
                if not transient.is_transient(exc):
                    return exc
                attempt += 1
                await self._pause("delivery", exc, attempt, item)
                future = await self._start(record)

    async def _acknowledged(self, future: asyncio.Future[Any]) -> None:
        """Wait for the future, checking now and then whether the worker is stopping (a delivery can take as long
        as the producer's request timeout, 20 minutes by default, before it fails and is retried)."""
        while not future.done():
            await asyncio.wait([future], timeout=1.0)
            if not future.done():
                self._check_stopping()
        future.result()

    async def _confirm_dead_letter(self, item: InputEvent, record: _Record, future: asyncio.Future[Any]) -> None:
        """A dead letter is never given up: refused for good, it is sent again without its copy of the payload."""
        attempt = 0
        while (refused := await self._confirm(item, record, future)) is not None:
            attempt += 1
            with tracing.activated(item.span):
                log.error(
                    "the dead-letter topic refused a dead letter; sending it again without the payload copy",
                    extra={
                        "error_type": type(refused).__name__,
                        "error": str(refused)[:200],
                        "attempt": attempt,
                        "offset": item.offset,
                    },
                )
            if attempt > 1:  # refused even without it (e.g. not authorised to write there): wait for the operator
                await asyncio.sleep(self.backoff.delay(attempt - 1))
                self._check_stopping()
            record = _without_payload(record)
            future = await self._start(record)

    def _dead_letter(self, item: InputEvent, error: BaseException, headers: tracing.KafkaHeaders) -> _Record:
        """The input's dead-letter record, counted, logged and marked on its span."""
        # The payload copy leaves room for the record's other fields within the producer's limit.
        record = dead_letter_record(
            self.service, item, error, max_payload=min(MAX_DEADLETTER_PAYLOAD, self._max_record_bytes - _RECORD_ROOM)
        )
        telemetry.EVENTS_FAILED.labels(self.service, record.reason).inc()
        telemetry.EVENTS_DEADLETTERED.labels(self.service, record.reason).inc()
        if item.span is not None:
            item.span.set_status(Status(StatusCode.ERROR, record.reason))
            item.span.set_attribute("sightline.deadletter.reason", record.reason)
        with tracing.activated(item.span):  # the log line carries the failed event's trace id
            if record.reason == "internal_error":
                log.error(
                    "unexpected failure; input sent to the dead-letter topic",
                    exc_info=error,
                    extra={"topic": item.topic, "partition": item.partition, "offset": item.offset},
                )
            else:
                log.warning(
                    "bad input sent to the dead-letter topic",
                    extra={"reason": record.reason, "detail": record.error, "offset": item.offset},
                )
        return _record(DEADLETTER.name, item.key or b"", record.SerializeToString(), headers, dead_letter=True)


def _headers(item: InputEvent) -> tracing.KafkaHeaders:
    """The headers of every record sent for an input: its span's trace context, and the input's capture time."""
    headers = tracing.kafka_headers(item.span)
    value = _captured_at_value(item.headers)
    if value is not None:
        headers.append((CAPTURED_AT_HEADER, value))
    return headers


def _record(topic: str, key: bytes, value: bytes, headers: tracing.KafkaHeaders, dead_letter: bool = False) -> _Record:
    """A record to send: the input's headers, then the event's own CloudEvents attributes (cloudevents.py)."""
    return _Record(topic, key, value, cloudevents.with_event_headers(topic, value, headers), dead_letter)


def _is_transient_failure(result: list[Output] | BaseException) -> bool:
    return isinstance(result, BaseException) and transient.is_transient(result)


def _record_size(record: _Record) -> int:
    """The record's size as the producer counts it against its limit (the same upper-bound estimate)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, list(record.headers)))


def _without_payload(record: _Record) -> _Record:
    letter = events_pb2.DeadLetter.FromString(record.value)
    letter.payload = b""
    letter.payload_truncated = letter.payload_truncated or letter.payload_size > 0
    return replace(record, value=letter.SerializeToString())


def dead_letter_record(
    stage: str, item: InputEvent, error: BaseException, max_payload: int = MAX_DEADLETTER_PAYLOAD
) -> events_pb2.DeadLetter:
    """The dead-letter record of a failed input: stage, reason, message, a reference to the input, its hash and size,
    and a copy of it (up to ``max_payload`` bytes) only when it is safe to copy (``may_copy_payload``)."""
    payload = item.value or b""
    copy = may_copy_payload(item.topic, payload)
    record = _letter(stage, error, item.topic, item.partition, item.offset, item.key or b"")
    record.payload = payload[:max_payload] if copy else b""
    record.payload_truncated = copy and len(payload) > max_payload
    record.payload_withheld = bool(payload) and not copy
    if payload:
        record.payload_sha256 = hashlib.sha256(payload).digest()
        record.payload_size = len(payload)
    return record


def source_dead_letter(
    stage: str,
    error: BaseException,
    *,
    source: str,
    key: bytes,
    sequence: int,
    frame_id: str = "",
    withheld: tuple[int, bytes] | None = None,
) -> events_pb2.DeadLetter:
    """The dead-letter record of an input that is not a consumed record (capture's frames of files and streams):
    the same fields as ``dead_letter_record``, the input referenced by its source's name (``source``: redacted, never
    with credentials), partition -1 and its ``sequence`` in that source.

    The record never carries the input's bytes (there is no event to copy). ``withheld`` (size, SHA-256 digest; the
    digest may be empty when the input was never read) describes the input: the record then says it was withheld,
    with that size and digest.
    """
    record = _letter(stage, error, source, -1, sequence, key)
    if frame_id:
        record.frame_id = frame_id
    if withheld is not None:
        record.payload_size, record.payload_sha256 = withheld
        record.payload_withheld = True
    return record


def _letter(
    stage: str, error: BaseException, topic: str, partition: int, offset: int, key: bytes
) -> events_pb2.DeadLetter:
    """What every dead letter says, whatever its input: the stage, the reason and the error, where the input was."""
    reason = getattr(error, "reason", None) or "internal_error"
    return events_pb2.DeadLetter(
        stage=stage,
        reason=reason,
        error=str(error)[:2000] if reason != "internal_error" else f"{type(error).__name__}: {str(error)[:500]}",
        input_topic=topic,
        input_partition=partition,
        input_offset=offset,
        input_key=key,
        frame_id=getattr(error, "frame_id", "") or "",
        failed_at=codec.now(),
    )


def may_copy_payload(topic: str, payload: bytes) -> bool:
    """Whether a failed input may be copied into its dead letter: only when it is the event its topic carries, with
    no fields that event does not define, and, on the frames topic, an image that starts like one. Anything else
    may be any content at all, and the dead-letter topic has other readers than the input topic."""
    spec = next((spec for spec in ALL_TOPICS if spec.name == topic), None)  # capture's inputs are files and URLs
    if spec is None:
        return False
    try:
        message = codec.parse(codec.event_class(spec), payload)
    except codec.MalformedEvent:
        return False
    size = message.ByteSize()
    message.DiscardUnknownFields()  # recursive: unknown fields anywhere in the event could carry anything
    if message.ByteSize() != size:
        return False
    if topic == FRAMES.name:
        from sightline.common.images import looks_like_image  # images loads OpenCV: only detection needs it here

        return isinstance(message, events_pb2.FrameCaptured) and looks_like_image(message.image)
    return True
