"""One stream stage: consume a topic, process each event (or a batch), publish the results, dead-letter failures.

Every stream service (detection, embedding, matching, decision) is a ``Stage`` with its own ``process`` function; this
module owns what they must all do the same way:

- Processing runs on a worker thread, so the event loop keeps heartbeating while a model runs.
- Results are sent before the event is acknowledged, and faust flushes the producer before it commits offsets:
  at-least-once delivery end to end.
- A bad input never stops the stage: it is published to the dead-letter topic with the stage, a reason and a
  reference to the input (topic, partition, offset), counted in metrics, and the stage goes on.
- Each input event is processed in its own span, a child of the context in the input record's headers (see
  tracing.py); every record sent for that event, outputs and dead letters alike, carries that span's context.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sightline.common import codec, telemetry, tracing
from sightline.common.topics import DEADLETTER, TopicSpec
from sightline.v1 import events_pb2

log = logging.getLogger(__name__)

MAX_DEADLETTER_PAYLOAD = 1024 * 1024


@dataclass(frozen=True)
class Output:
    """An event to publish: protobuf bytes on a topic, keyed by source id."""

    topic: TopicSpec
    key: bytes
    value: bytes


@dataclass(frozen=True)
class InputEvent:
    """What a stage's process function sees of one consumed record."""

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


# A process function gets a batch of inputs and returns, per input, either its outputs or the error it raised.
ProcessBatch = Callable[[Sequence[InputEvent]], list["list[Output] | BaseException"]]


def one_at_a_time(process: Callable[[InputEvent], list[Output]]) -> ProcessBatch:
    """Adapt a per-event function to a batch function, isolating each event's failure."""

    def batch(events: Sequence[InputEvent]) -> list[list[Output] | BaseException]:
        results: list[list[Output] | BaseException] = []
        for event in events:
            try:
                with tracing.activated(event.span):  # logs of this event carry its own trace id, even in a batch
                    results.append(process(event))
            except Exception as exc:  # noqa: BLE001 - isolated per event, reported to the dead-letter topic
                results.append(exc)
        return results

    return batch


@dataclass
class Stage:
    """Binds a process function to an input topic on a faust app."""

    service: str
    input: TopicSpec
    outputs: Sequence[TopicSpec]
    process: ProcessBatch
    max_batch: int = 1
    batch_wait_s: float = 0.0
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))

    def attach(self, app: Any) -> None:
        """Declare the faust agent that runs this stage."""
        source = app.topic(self.input.name, value_type=bytes, key_type=bytes)
        sinks = {spec.name: app.topic(spec.name, value_type=bytes, key_type=bytes) for spec in [*self.outputs, DEADLETTER]}

        async def agent(stream: Any) -> None:
            async for events in stream.take_events(self.max_batch, within=self.batch_wait_s or 0.001):
                await self._handle(list(events), sinks)

        app.agent(source, name=f"sightline-{self.service}-stage")(agent)

    async def _handle(self, events: list[Any], sinks: dict[str, Any]) -> None:
        inputs = [self._input_of(event) for event in events]
        loop = asyncio.get_running_loop()
        try:
            with telemetry.timed(telemetry.STAGE_LATENCY, service=self.service, stage=self.service):
                try:
                    results = await loop.run_in_executor(self._executor, self._process, inputs)
                except Exception as exc:  # noqa: BLE001 - a failed batch is dead-lettered, the stage goes on
                    results = [exc] * len(inputs)
            for item, result in zip(inputs, results, strict=True):
                await self._publish(item, result, sinks)
        finally:
            for item in inputs:
                item.span.end()  # type: ignore[union-attr]

    def _input_of(self, event: Any) -> InputEvent:
        """The event as the process function sees it, with its span: a child of the context in its headers."""
        message = event.message
        headers = tuple(message.headers or ())
        span = tracing.tracer.start_span(
            self.service, context=tracing.context_from_headers(headers), kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": message.topic,
                        "messaging.destination.partition.id": str(message.partition),
                        "messaging.kafka.offset": message.offset},
        )  # fmt: skip
        return InputEvent(key=message.key, value=message.value, topic=message.topic, partition=message.partition,
                          offset=message.offset, headers=headers, span=span)  # fmt: skip

    def _process(self, inputs: list[InputEvent]) -> list[list[Output] | BaseException]:
        # Runs on the worker thread, which does not inherit the event loop's context: a lone event's span is made
        # current here; in a batch, one_at_a_time (or the batch function) makes each event's span current in turn.
        with tracing.activated(inputs[0].span if len(inputs) == 1 else None):
            return self.process(inputs)

    async def _publish(self, item: InputEvent, result: list[Output] | BaseException, sinks: dict[str, Any]) -> None:
        """Send the event's outputs, or its dead letter, each with the context of the event's own span."""
        headers = tracing.kafka_headers(item.span)
        if isinstance(result, BaseException):
            await self._dead_letter(item, result, sinks[DEADLETTER.name], headers)
            return
        for output in result:
            # A fresh list per record: faust may add its own headers to the list it is given.
            await sinks[output.topic.name].send(key=output.key, value=output.value, headers=list(headers))
            telemetry.EVENTS_PUBLISHED.labels(self.service, output.topic.name).inc()
        telemetry.EVENTS_PROCESSED.labels(self.service, item.topic).inc()

    async def _dead_letter(self, item: InputEvent, error: BaseException, sink: Any,
                           headers: tracing.KafkaHeaders) -> None:  # fmt: skip
        record = dead_letter_record(self.service, item, error)
        telemetry.EVENTS_FAILED.labels(self.service, record.reason).inc()
        telemetry.EVENTS_DEADLETTERED.labels(self.service, record.reason).inc()
        if item.span is not None:
            item.span.set_status(Status(StatusCode.ERROR, record.reason))
            item.span.set_attribute("sightline.deadletter.reason", record.reason)
        with tracing.activated(item.span):  # the log line carries the failed event's trace id
            if record.reason == "internal_error":
                log.error("unexpected failure; input sent to the dead-letter topic", exc_info=error,
                          extra={"topic": item.topic, "partition": item.partition, "offset": item.offset})  # fmt: skip
            else:
                log.warning("bad input sent to the dead-letter topic",
                            extra={"reason": record.reason, "detail": record.error, "offset": item.offset})  # fmt: skip
        await sink.send(key=item.key or b"", value=record.SerializeToString(), headers=list(headers))


def dead_letter_record(stage: str, item: InputEvent, error: BaseException) -> events_pb2.DeadLetter:
    """The dead-letter record of a failed input: stage, reason, message and a reference to (and copy of) the input."""
    reason = getattr(error, "reason", None) or "internal_error"
    payload = item.value or b""
    return events_pb2.DeadLetter(
        stage=stage,
        reason=reason,
        error=str(error)[:2000] if reason != "internal_error" else f"{type(error).__name__}: {str(error)[:500]}",
        input_topic=item.topic,
        input_partition=item.partition,
        input_offset=item.offset,
        input_key=item.key or b"",
        payload=payload[:MAX_DEADLETTER_PAYLOAD],
        payload_truncated=len(payload) > MAX_DEADLETTER_PAYLOAD,
        frame_id=getattr(error, "frame_id", "") or "",
        failed_at=codec.now(),
    )

