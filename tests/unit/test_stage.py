"""The stage seam's pure parts (common/stage.py): ``EventProcessor`` isolates each event's failure and makes its span
current, dead letters say what failed and where (for consumed records and for capture's sources alike, from one
builder), and the capture-time header is written and read in one way.

Delivery through a real broker (failure isolation in a batch, headers copied on, latency observed, output too large)
is tests/integration/test_stage_batch.py.
"""

from __future__ import annotations

import hashlib

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from sightline.common import codec
from sightline.common.stage import (
    CAPTURED_AT_HEADER,
    EventProcessor,
    InputEvent,
    Output,
    StageError,
    captured_at,
    captured_at_header,
    dead_letter_record,
    source_dead_letter,
)
from sightline.common.topics import FACES
from sightline.v1 import events_pb2, types_pb2

TRACER = TracerProvider().get_tracer("test-stage")  # real spans, without installing a provider for the process


class Recorder(EventProcessor):
    """Echoes each event on the faces topic; fails the ones whose value says so; notes the span current for each."""

    def __init__(self) -> None:
        self.current: list[trace.Span] = []

    def process_event(self, event: InputEvent) -> list[Output]:
        self.current.append(trace.get_current_span())
        value = event.value or b""
        if value.startswith(b"bad"):
            raise StageError("bad_input", f"refused {value.decode()}")
        if value.startswith(b"bug"):
            raise KeyError("a bug in the processor")
        return [Output(FACES, event.key or b"", value)]


def event(value: bytes, offset: int, topic: str = FACES.name, span: trace.Span | None = None) -> InputEvent:
    return InputEvent(key=b"cam", value=value, topic=topic, partition=3, offset=offset, span=span)


def test_an_event_processor_isolates_each_failure_keeps_the_order_and_makes_each_span_current() -> None:
    spans = [TRACER.start_span(f"event-{i}") for i in range(4)]
    events = [
        event(value, i, span=span)
        for i, (value, span) in enumerate(zip((b"one", b"bad-two", b"bug-three", b"four"), spans, strict=True))
    ]
    recorder = Recorder()

    results = recorder.process(events)

    assert len(results) == 4
    assert results[0] == [Output(FACES, b"cam", b"one")] and results[3] == [Output(FACES, b"cam", b"four")]
    assert isinstance(results[1], StageError) and results[1].reason == "bad_input"
    assert isinstance(results[2], KeyError)  # any error is the event's own: dead-lettered as internal_error
    assert recorder.current == spans  # each event processed with its own span current: its logs carry its trace id
    assert not trace.get_current_span().get_span_context().is_valid, "and none is left current afterwards"


def test_a_dead_letter_names_the_stage_the_reason_the_error_and_the_input() -> None:
    payload = events_pb2.FacesDetected(frame=types_pb2.FrameRef(frame_id="cam:7")).SerializeToString()
    letter = dead_letter_record("embedding", event(payload, 41), StageError("bad_chip", "chip too short", "cam:7"))
    assert (letter.stage, letter.reason, letter.error, letter.frame_id) == (
        "embedding",
        "bad_chip",
        "chip too short",
        "cam:7",
    )
    assert (letter.input_topic, letter.input_partition, letter.input_offset, letter.input_key) == (
        FACES.name,
        3,
        41,
        b"cam",
    )
    assert letter.payload_sha256 == hashlib.sha256(payload).digest() and letter.payload_size == len(payload)
    assert letter.payload == payload and not letter.payload_withheld, "the topic's own event: copied"
    assert abs(codec.seconds_since(letter.failed_at)) < 60

    malformed = dead_letter_record("embedding", event(b"\xff\xfe", 42), codec.MalformedEvent("not a FacesDetected"))
    assert malformed.reason == "malformed_event" and malformed.payload_withheld and not malformed.payload
    assert malformed.payload_sha256 == hashlib.sha256(b"\xff\xfe").digest() and malformed.payload_size == 2

    internal = dead_letter_record("embedding", event(payload, 43), KeyError("x" * 5000))
    assert internal.reason == "internal_error" and internal.error.startswith("KeyError: ")
    assert len(internal.error) < 600, "an unexpected error's text is cut short: it may hold anything"
    assert len(dead_letter_record("embedding", event(payload, 44), StageError("r", "y" * 5000)).error) == 2000


def test_a_dead_letter_of_a_capture_source_has_the_same_fields_and_refers_to_the_source() -> None:
    error = StageError("frame_too_large", "upload.jpg is too large")
    digest = hashlib.sha256(b"the file").digest()
    letter = source_dead_letter(
        "capture",
        error,
        source="folder:/srv/uploads",
        key=b"cam",
        sequence=12,
        frame_id="cam:run:12",
        withheld=(8, digest),
    )
    assert (letter.input_topic, letter.input_partition, letter.input_offset, letter.input_key) == (
        "folder:/srv/uploads",
        -1,
        12,
        b"cam",
    )
    assert (letter.stage, letter.reason, letter.error, letter.frame_id) == (
        "capture",
        "frame_too_large",
        "upload.jpg is too large",
        "cam:run:12",
    )
    assert letter.payload_withheld and letter.payload == b"" and not letter.payload_truncated
    assert (letter.payload_size, letter.payload_sha256) == (8, digest)

    # The fields they share come from one builder: a consumed record's letter differs only where the input is.
    record = dead_letter_record("capture", InputEvent(b"cam", None, "folder:/srv/uploads", -1, 12), error)
    for letter_ in (letter, record):
        letter_.ClearField("failed_at")
    record.frame_id, record.payload_size, record.payload_sha256, record.payload_withheld = (
        "cam:run:12",
        8,
        digest,
        True,
    )
    assert record == letter


def test_the_capture_time_header_is_epoch_milliseconds_and_only_a_well_formed_one_is_read() -> None:
    stamp = codec.now()
    name, value = captured_at_header(stamp)
    assert name == CAPTURED_AT_HEADER == "sightline-captured-at"
    assert value.isdigit() and int(value) == stamp.ToMilliseconds()
    assert captured_at([("traceparent", b"00-ab-cd-01"), (name, value)]) == pytest.approx(
        codec.seconds(stamp), abs=1e-3
    )
    assert captured_at([(name, b"1700000000000"), (name, b"1")]) == 1_700_000_000.0  # the first one counts
    for garbage in (b"", b"soon", b"-5", b"1.5", b"9" * 17, "1700000000000"):
        assert captured_at([(name, garbage)]) is None, garbage  # type: ignore[list-item]
    assert captured_at([]) is None and captured_at([("other", b"1700000000000")]) is None
