"""The CloudEvents attributes Sightline puts on its records (common/cloudevents.py): one rule per topic's event, ids
derived from the event itself (the same event twice, the same id), the Kafka binding reading them back, and no
attributes for what is not an event. tests/integration/test_cloudevents.py reads them off the real topics."""

from __future__ import annotations

from datetime import UTC, datetime

from cloudevents.core.bindings import kafka as kafka_binding
from cloudevents.core.formats.json import JSONFormat
from google.protobuf.timestamp_pb2 import Timestamp

from sightline.common import codec
from sightline.common.audit_checkpoints import EVENT_HEADER, EVENT_NAME, Checkpoint
from sightline.common.cloudevents import (
    CHECKPOINT_TYPE,
    RULES,
    CloudEventsSettings,
    attributes_of,
    with_event_headers,
)
from sightline.common.topics import ALERTS, ALL_TOPICS, AUDIT, DEADLETTER, DECISIONS, SESSIONS
from sightline.v1 import events_pb2, session_pb2, types_pb2

AT = Timestamp(seconds=1_798_761_600, nanos=250_000_000)
TRACE = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


def attributes(topic: str, event: object, headers: list[tuple[str, bytes]] | None = None) -> dict[str, str]:
    return attributes_of(with_event_headers(topic, event.SerializeToString(), headers or []))  # type: ignore[attr-defined]


def test_every_topics_event_has_a_rule() -> None:
    assert {codec.event_class(spec).DESCRIPTOR.full_name for spec in ALL_TOPICS} <= set(RULES)


def test_a_decision_carries_every_attribute_after_its_trace_context() -> None:
    decision = events_pb2.Decision(decision_id="3f9d2c61", frame=types_pb2.FrameRef(frame_id="cam:r1:4"), decided_at=AT)
    headers = with_event_headers(DECISIONS.name, decision.SerializeToString(), [TRACE])
    assert headers[0] == TRACE
    assert attributes_of(headers) == {
        "id": "3f9d2c61",
        "source": "/sightline/decision",
        "type": "sightline.v1.Decision",
        "specversion": "1.0",
        "time": "2027-01-01T00:00:00.250000Z",
        "datacontenttype": "application/protobuf",
        "dataschema": "urn:sightline:protos:sightline/v1/events.proto",
    }


def test_the_kafka_binding_reads_the_event_back() -> None:
    decision = events_pb2.Decision(decision_id="3f9d2c61", decided_at=AT)
    value = decision.SerializeToString()
    message = kafka_binding.KafkaMessage(dict(with_event_headers(DECISIONS.name, value, [])), b"cam", value)
    event = kafka_binding.from_binary(message, JSONFormat())
    assert event.get_id() == "3f9d2c61" and event.get_type() == "sightline.v1.Decision"
    assert event.get_time() == datetime(2027, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)
    assert events_pb2.Decision.FromString(event.get_data()) == decision  # type: ignore[arg-type]


def test_the_same_event_made_again_has_the_same_id_and_a_status_change_a_new_one() -> None:
    alert = events_pb2.Alert(alert_id="88b0c8d2", status=events_pb2.ALERT_STATUS_PENDING_REVIEW, raised_at=AT)
    again = events_pb2.Alert(alert_id="88b0c8d2", status=events_pb2.ALERT_STATUS_PENDING_REVIEW, raised_at=AT)
    again.evidence_frame_ids.append("cam:r1:9")  # a replay may differ in detail: it is still the same alert
    assert attributes(ALERTS.name, alert)["id"] == attributes(ALERTS.name, again)["id"] == "88b0c8d2:PENDING_REVIEW"
    alert.status = events_pb2.ALERT_STATUS_CONFIRMED
    confirmed = attributes(ALERTS.name, alert)
    assert confirmed["id"] == "88b0c8d2:CONFIRMED"
    assert confirmed["time"] != "2027-01-01T00:00:00.250000Z"  # a review happens when it is published


def test_session_events_name_their_kind_progress_and_producer() -> None:
    def event(kind: int, frames_seen: int = 0) -> dict[str, str]:
        update = session_pb2.SessionUpdate(frames_seen=frames_seen)
        return attributes(SESSIONS.name, session_pb2.SessionEvent(kind=kind, session_id="s1", at=AT, update=update))

    kinds = session_pb2.SessionEvent
    assert event(kinds.KIND_OPENED)["id"] == "s1:OPENED" and event(kinds.KIND_OPENED)["source"] == "/sightline/capture"
    assert event(kinds.KIND_PROGRESS, 3)["id"] == "s1:PROGRESS:3" != event(kinds.KIND_PROGRESS, 4)["id"]
    assert event(kinds.KIND_DECIDED)["source"] == "/sightline/decision"
    assert event(kinds.KIND_DECIDED)["dataschema"] == "urn:sightline:protos:sightline/v1/session.proto"


def test_a_dead_letter_is_named_by_its_stage_and_input() -> None:
    consumed = events_pb2.DeadLetter(stage="detection", input_topic="t", input_partition=2, input_offset=7)
    assert attributes(DEADLETTER.name, consumed)["id"] == "detection:t:2:7"
    assert attributes(DEADLETTER.name, consumed)["source"] == "/sightline/detection"
    captured = events_pb2.DeadLetter(stage="capture", input_topic="folder", input_partition=-1, frame_id="cam:r1:5")
    assert attributes(DEADLETTER.name, captured)["id"] == "capture:cam:r1:5"


def test_a_signed_checkpoint_is_a_json_event_of_its_own_type() -> None:
    checkpoint = Checkpoint("c" * 64, 12, "h" * 64, "2027-01-01T00:00:00.000000Z", "k1", "00")
    found = attributes_of(with_event_headers(AUDIT.name, checkpoint.to_json(), [(EVENT_HEADER, EVENT_NAME)]))
    assert found["id"] == f"{'c' * 64}:12" and found["type"] == CHECKPOINT_TYPE
    assert found["datacontenttype"] == "application/json" and "dataschema" not in found
    assert found["time"] == "2027-01-01T00:00:00Z" and found["source"] == "/sightline/audit"


def test_what_is_not_an_event_gets_no_attributes_and_given_attributes_stay() -> None:
    decision = events_pb2.Decision(decision_id="d1").SerializeToString()
    assert with_event_headers(DECISIONS.name, b"\xff\xfe not protobuf", [TRACE]) == [TRACE]
    assert with_event_headers(DECISIONS.name, events_pb2.Decision().SerializeToString(), []) == []  # no id
    assert with_event_headers("someone.elses.topic", decision, []) == []
    forwarded = [("ce_specversion", b"1.0"), ("ce_id", b"theirs")]
    assert with_event_headers(DECISIONS.name, decision, forwarded) == forwarded


def test_the_source_prefix_and_schema_base_are_settings() -> None:
    settings = CloudEventsSettings(source_prefix="//border.example.org/sightline", dataschema_base="https://x/protos/")
    value = events_pb2.Decision(decision_id="d1").SerializeToString()
    found = attributes_of(with_event_headers(DECISIONS.name, value, [], settings=settings))
    assert found["source"] == "//border.example.org/sightline/decision"
    assert found["dataschema"] == "https://x/protos/sightline/v1/events.proto"
