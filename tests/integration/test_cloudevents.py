"""CloudEvents attributes on every topic, read back from the real broker of a real local stack.

The demo's camera sequence (a watchlisted face, strangers, broken frames), a file capture withholds, a gate session,
an erasure and the audit records they cause put records on every topic, through both publishing paths: the stream
stages and the kafka-python producers (capture, the session desk, matching's erasure notices, the audit copies). Each
record is checked for its attributes (id derived from the event, source, type, time, content type, schema) and, on
the frame path, for its trace context. Then a match result is published again, as a replay is: the decisions it
gives again have the same ``ce_id`` as the first time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from sightline.cli.demo import WATCHLIST, build_sequence, create_watchlist, sample_paths
from sightline.cli.gallery import enroll
from sightline.cli.gate import open_request, run_session
from sightline.cli.outcomes import collect
from sightline.cli.run import ingest
from sightline.common import codec
from sightline.common.audit_checkpoints import is_checkpoint
from sightline.common.bus import make_producer, read_topics
from sightline.common.cloudevents import attributes_of
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel
from sightline.common.topics import (
    ALERTS,
    ALL_TOPICS,
    AUDIT,
    DEADLETTER,
    DECISIONS,
    EMBEDDINGS,
    ERASURES,
    FACES,
    FRAMES,
    MATCHES,
    SESSIONS,
    by_name,
)
from sightline.tooling.localstack import LocalStack, client_token
from sightline.v1 import audit_pb2, events_pb2, gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc

SOURCE = "ce-camera"
GATE = "ce-gate"
# The topics whose records carry a trace context: those of the frame path (tests/integration/test_tracing.py).
TRACED = {FRAMES.name, FACES.name, EMBEDDINGS.name, MATCHES.name, DECISIONS.name, ALERTS.name, DEADLETTER.name}
PRODUCER = {
    FRAMES.name: "capture",
    FACES.name: "detection",
    EMBEDDINGS.name: "embedding",
    MATCHES.name: "matching",
    DECISIONS.name: "decision",
    ALERTS.name: "decision",
    ERASURES.name: "matching",
}


def expected_id(event: Message) -> str:
    """The contract, written out again: the id each event type's records must carry."""
    if isinstance(event, events_pb2.Decision):
        return event.decision_id
    if isinstance(event, events_pb2.Alert):
        return f"{event.alert_id}:{events_pb2.AlertStatus.Name(event.status).removeprefix('ALERT_STATUS_')}"
    if isinstance(event, session_pb2.SessionEvent):
        kind = session_pb2.SessionEvent.Kind.Name(event.kind).removeprefix("KIND_")
        return f"{event.session_id}:{kind}" + (f":{event.update.frames_seen}" if kind == "PROGRESS" else "")
    if isinstance(event, events_pb2.SubjectErased):
        return f"{event.subject_id}:{event.erased_at.ToJsonString()}"
    if isinstance(event, events_pb2.DeadLetter):
        if event.input_partition < 0:
            return f"{event.stage}:{event.frame_id}"
        return f"{event.stage}:{event.input_topic}:{event.input_partition}:{event.input_offset}"
    if isinstance(event, audit_pb2.AuditRecord):
        return event.hash
    return str(event.frame.frame_id)  # type: ignore[attr-defined]


def expected_source(topic: str, event: Message) -> str:
    if isinstance(event, session_pb2.SessionEvent):
        ours = event.kind in (session_pb2.SessionEvent.KIND_PROGRESS, session_pb2.SessionEvent.KIND_DECIDED)
        return "/sightline/decision" if ours else "/sightline/capture"
    if isinstance(event, events_pb2.DeadLetter):
        return f"/sightline/{event.stage}"
    return "/sightline/audit" if topic == AUDIT.name else f"/sightline/{PRODUCER[topic]}"


def is_ours(event: Message) -> bool:
    """Whether an event came from this test's inputs (the session broker is shared with other tests)."""
    if isinstance(event, session_pb2.SessionEvent):
        return event.gate_id == GATE
    if isinstance(event, events_pb2.Alert):
        return event.source_id == SOURCE
    if isinstance(event, events_pb2.DeadLetter):
        return event.frame_id.startswith(f"{SOURCE}:")
    if "frame" in event.DESCRIPTOR.fields_by_name:
        return bool(event.frame.source_id == SOURCE)  # type: ignore[attr-defined]
    return True  # erasures and audit records: this stack's broker carries only this test's


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The camera's folder: the only one capture may read."""
    return tmp_path_factory.mktemp("ce-frames")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, frames: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("ce-run"), ports="auto", capture_roots=[frames]) as running:
        running.start(timeout=180)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers)


@pytest.fixture(scope="module")
def published(stack: LocalStack, kafka: KafkaSettings, face_photos: Path, frames: Path) -> dict[str, list[Any]]:
    """Records on every topic from this test's inputs, by topic: (record, parsed event or None for checkpoints)."""
    since = int(time.time() * 1000) - 1000
    token = client_token(stack.run_dir)
    matching = stack.addresses["matching"]
    create_watchlist(matching)
    assert enroll("obama", [face_photos / "obama.jpg"], [WATCHLIST], "Barack Obama", matching, token) == 1
    assert enroll("biden", [face_photos / "biden.jpg"], [], "Joe Biden", matching, token) == 1
    photos, strangers = sample_paths()
    expected = build_sequence(photos, strangers, frames)
    (frames / f"{len(expected) + 1:03d}-text.jpg").write_bytes(b"not an image at all")  # capture withholds it
    sequences = {e.sequence for e in expected} | {len(expected) + 1}
    ingest(str(frames), source_id=SOURCE, address=stack.addresses["capture"], progress=False, token=token)
    outcomes = collect(kafka, SOURCE, sequences, since, timeout_s=120)
    assert outcomes.done(sequences) and outcomes.alerts, "the sequence did not go through with an alert"

    kiosk = session_pb2_grpc.KioskServiceStub(channel(stack.addresses["capture"], token))
    gate_frames = [(face_photos / name).read_bytes() for name in ("obama2.jpg", "obama3.jpg", "obama.jpg")]
    run = run_session(kiosk, open_request(GATE, subject="obama"), gate_frames, fps=10.0, timeout=60)
    assert run.outcome is not None, "the gate session had no outcome"

    gallery = gallery_pb2_grpc.GalleryServiceStub(channel(matching, token))
    gallery.EraseSubject(gallery_pb2.EraseSubjectRequest(subject_id="biden", reference="case-ce-1"), timeout=60)

    found: dict[str, list[Any]] = defaultdict(list)
    for record in read_topics(kafka, [spec.name for spec in ALL_TOPICS], since, idle_timeout_s=3.0):
        if record.topic == AUDIT.name and is_checkpoint(record.headers):
            found[record.topic].append((record, None))
            continue
        event = codec.parse(codec.event_class(by_name(record.topic)), record.value)
        if is_ours(event):
            found[record.topic].append((record, event))
    return found


def test_every_topic_has_records(published: dict[str, list[Any]]) -> None:
    assert {spec.name for spec in ALL_TOPICS} == set(published), "a topic without a record went unchecked"
    kinds = {event.kind for _, event in published[SESSIONS.name]}
    assert {session_pb2.SessionEvent.KIND_OPENED, session_pb2.SessionEvent.KIND_DECIDED} <= kinds
    dead_stages = {event.stage for _, event in published[DEADLETTER.name]}
    assert {"capture", "detection"} <= dead_stages, "both publishing paths' dead letters"


def test_every_record_carries_its_events_attributes(published: dict[str, list[Any]]) -> None:
    for topic, records in published.items():
        for record, event in records:
            found = attributes_of(record.headers)
            assert found["specversion"] == "1.0", (topic, found)
            assert datetime.fromisoformat(found["time"]).utcoffset() is not None, (topic, found)
            if event is None:  # a signed checkpoint of the audit chain
                assert (found["type"], found["datacontenttype"]) == ("sightline.v1.AuditCheckpoint", "application/json")
                continue
            where = f"{topic} {expected_id(event)}"
            assert found["id"] == expected_id(event), where
            assert found["type"] == event.DESCRIPTOR.full_name, where
            assert found["source"] == expected_source(topic, event), where
            assert found["datacontenttype"] == "application/protobuf", where
            assert found["dataschema"] == f"urn:sightline:protos:{event.DESCRIPTOR.file.name}", where


def test_frame_path_records_keep_their_trace_context(published: dict[str, list[Any]]) -> None:
    for topic in TRACED:
        for record, _event in published[topic]:
            headers = dict(record.headers)
            assert headers.get("traceparent", b"").startswith(b"00-"), topic
            assert [key for key, _ in record.headers].count("ce_id") == 1, topic


def test_ids_are_unique_within_each_topic(published: dict[str, list[Any]]) -> None:
    for topic, records in published.items():
        ids = [attributes_of(record.headers)["id"] for record, _ in records]
        assert len(ids) == len(set(ids)), f"{topic}: the same id on two events"


def test_a_replayed_match_result_gives_decisions_with_the_same_ids(
    published: dict[str, list[Any]], kafka: KafkaSettings
) -> None:
    alerted = {event.decision_id for _, event in published[ALERTS.name]}
    first = defaultdict(set)
    for record, event in published[DECISIONS.name]:
        first[event.frame.frame_id].add(attributes_of(record.headers)["id"])
    frame_id = next(
        event.frame.frame_id for _, event in published[DECISIONS.name] if event.decision_id in alerted
    )  # the frame that raised the alert: the richest replay
    record = next(r for r, event in published[MATCHES.name] if event.frame.frame_id == frame_id)
    assert first[frame_id], "no decision of the frame to replay"

    since = int(time.time() * 1000) - 100
    producer = make_producer(kafka)
    try:  # published again as it was, headers included: the replay of a record, as a restarted stage reads it
        producer.send(MATCHES.name, key=record.key, value=record.value, headers=list(record.headers)).get(timeout=10)
    finally:
        producer.close()
    again: set[str] = set()
    deadline = time.monotonic() + 60
    while len(again) < len(first[frame_id]) and time.monotonic() < deadline:
        for decided in read_topics(kafka, [DECISIONS.name], since, idle_timeout_s=1.0):
            if codec.parse(events_pb2.Decision, decided.value).frame.frame_id == frame_id:
                again.add(attributes_of(decided.headers)["id"])
    assert again == first[frame_id]
