"""Trace context across Sightline: W3C ``traceparent`` in Kafka record headers and gRPC metadata, ids in the logs.

(a) The carriers round-trip in-process. (b) On a real local stack, every record derived from one frame (faces,
embeddings, matches, decisions, dead letters) carries that frame's trace id, each stage with its own span id, also when
the embedding stage batches several frames into one model call. (c) A gallery request's trace id reaches the detection
and embedding services' logs through gRPC metadata. (d) With the console exporter a service starts, serves, and
writes its spans as JSON lines.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from sightline.cli.outcomes import collect
from sightline.cli.run import ingest
from sightline.common import codec, tracing
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel, check_health
from sightline.common.topics import DEADLETTER, DECISIONS, EMBEDDINGS, FACES, FRAMES, MATCHES, by_name
from sightline.tooling.broker import free_port
from sightline.tooling.localstack import HOST, LocalStack
from sightline.v1 import gallery_pb2, gallery_pb2_grpc

SOURCE = "trace-camera"
STAGE_OF_TOPIC = {
    FRAMES.name: "capture",
    FACES.name: "detection",
    EMBEDDINGS.name: "embedding",
    MATCHES.name: "matching",
    DECISIONS.name: "decision",
}
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def a_span(trace_state: TraceState | None = None) -> NonRecordingSpan:
    context = SpanContext(
        secrets.randbits(128) | 1,
        secrets.randbits(64) | 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace_state,
    )
    return NonRecordingSpan(context)


def context_ids(context: Any) -> tuple[int, int]:
    span_context = trace.get_current_span(context).get_span_context()
    return span_context.trace_id, span_context.span_id


# --- (a) carriers ------------------------------------------------------------------------------------------------


def test_kafka_headers_round_trip_the_context() -> None:
    span = a_span(TraceState([("vendor", "v1")]))
    headers = tracing.kafka_headers(span)
    assert all(isinstance(key, str) and isinstance(value, bytes) for key, value in headers)
    sent = span.get_span_context()
    assert dict(headers)["traceparent"] == f"00-{sent.trace_id:032x}-{sent.span_id:016x}-01".encode()
    assert dict(headers)["tracestate"] == b"vendor=v1"
    received = tracing.context_from_headers([("other", b"x"), *headers])
    assert context_ids(received) == (sent.trace_id, sent.span_id)
    assert trace.get_current_span(received).get_span_context().trace_state.get("vendor") == "v1"


def test_missing_or_garbled_headers_start_a_new_trace() -> None:
    for headers in (None, [], [("traceparent", b"not a traceparent")], [("traceparent", b"\xff\xfe")]):
        assert not trace.get_current_span(tracing.context_from_headers(headers)).get_span_context().is_valid
    assert tracing.kafka_headers() == []  # no span is current here: nothing to inject


def test_grpc_metadata_round_trip_replaces_a_stale_context() -> None:
    span = a_span()
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    metadata = tracing.metadata_with_context([("x-request-id", "7"), ("traceparent", stale)], span)
    assert [key for key, _ in metadata].count("traceparent") == 1 and ("x-request-id", "7") in metadata
    sent = span.get_span_context()
    assert context_ids(tracing.context_from_metadata(metadata)) == (sent.trace_id, sent.span_id)
    assert tracing.parse_traceparent(dict(metadata)["traceparent"]) == (f"{sent.trace_id:032x}", f"{sent.span_id:016x}")


# --- a real stack ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    # A long batch window, so that the embedding stage surely embeds several frames in one call.
    with LocalStack(
        tmp_path_factory.mktemp("tracing"), ports="auto", env={"SIGHTLINE_EMBEDDING_BATCH_WAIT_MS": "1500"}
    ) as running:
        running.start(timeout=120)
        yield running


def json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def wait_for_log(path: Path, trace_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The JSON log lines of the file that carry the trace id, once there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in json_lines(path) if entry.get("trace_id") == trace_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def frame_id_of(message: Any) -> str:
    return message.frame.frame_id if "frame" in message.DESCRIPTOR.fields_by_name else message.frame_id


def ids_by_frame(kafka: KafkaSettings, since_ms: int) -> dict[str, dict[str, set[tuple[str, str]]]]:
    """frame id -> topic -> the (trace id, span id) pairs of its records on that topic."""
    found: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for record in read_topics(kafka, [*STAGE_OF_TOPIC, DEADLETTER.name], since_ms, idle_timeout_s=1.5):
        frame_id = frame_id_of(codec.parse(codec.event_class(by_name(record.topic)), record.value))
        if frame_id.startswith(f"{SOURCE}:"):
            traceparent = dict(record.headers or []).get("traceparent", b"").decode()
            found[frame_id][record.topic].add(tracing.parse_traceparent(traceparent))
    return found


def embedded_batches(stack: LocalStack) -> tuple[float, float]:
    """(model calls with at most one chip, all model calls) of the embedding service, from its metrics."""
    port = stack.metrics_ports["embedding"]
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sightline_batch_size_")
    }
    single = values['sightline_batch_size_bucket{le="1.0",service="embedding"}']
    return single, values['sightline_batch_size_count{service="embedding"}']


# --- (b) the stream path -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced_frames(stack: LocalStack, face_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four photos and a broken file through the whole stack; the trace ids of every record, by frame id."""
    folder = tmp_path_factory.mktemp("frames")
    for index, name in enumerate(PHOTOS, 1):
        (folder / f"{index:03d}-{name}").write_bytes((face_photos / name).read_bytes())
    # Starts like a JPEG, so capture passes it on and detection dead-letters it (capture itself withholds a file
    # that does not even start like an image).
    (folder / "005-broken.jpg").write_bytes(b"\xff\xd8\xff\xdb" + bytes(17))
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
    since = int(time.time() * 1000) - 1000
    final = ingest(str(folder), source_id=SOURCE, no_pacing=True, address=stack.addresses["capture"], progress=False)
    assert final.frames_published == 5
    outcomes = collect(kafka, SOURCE, {1, 2, 3, 4, 5}, since, timeout_s=60)
    assert outcomes.done({1, 2, 3, 4, 5}), "not every frame went through"
    return ids_by_frame(kafka, since)


def test_every_record_of_a_frame_carries_its_trace_with_one_span_per_stage(traced_frames: dict[str, Any]) -> None:
    assert len(traced_frames) == 5
    roots = set()
    for frame_id, topics in traced_frames.items():
        (root,) = topics[FRAMES.name]
        assert root[0], f"{frame_id}: the frame record has no trace context"
        roots.add(root[0])
        broken = frame_id.endswith(":5")
        expected = {FRAMES.name, DEADLETTER.name} if broken else set(STAGE_OF_TOPIC)
        assert set(topics) == expected, frame_id
        spans = {topic: {span for _, span in ids} for topic, ids in topics.items()}
        assert {trace_id for ids in topics.values() for trace_id, _ in ids} == {root[0]}, frame_id
        assert all(len(ids) == 1 for ids in spans.values()), f"{frame_id}: one stage span per topic: {spans}"
        assert len({next(iter(ids)) for ids in spans.values()}) == len(spans), f"{frame_id}: stages share a span"
    assert len(roots) == 5, "each frame starts its own trace"


def test_batched_frames_each_keep_their_own_trace(stack: LocalStack, traced_frames: dict[str, Any]) -> None:
    single, calls = embedded_batches(stack)
    assert single < calls, "the embedding stage never batched two frames: the batching case went untested"
    embedded = [topics[EMBEDDINGS.name] for topics in traced_frames.values() if EMBEDDINGS.name in topics]
    assert len({trace_id for ids in embedded for trace_id, _ in ids}) == len(embedded) == 4


def test_a_dead_lettered_frame_is_logged_with_its_trace_id(stack: LocalStack, traced_frames: dict[str, Any]) -> None:
    (broken,) = [topics for topics in traced_frames.values() if DEADLETTER.name in topics]
    ((trace_id, span_id),) = broken[DEADLETTER.name]
    logged = wait_for_log(stack.log_path("detection"), trace_id)
    assert any(
        e["msg"].startswith("bad input") and e["reason"] == "undecodable_image" and e["span_id"] == span_id
        for e in logged
    ), logged


# --- (c) the request path ----------------------------------------------------------------------------------------


def test_a_gallery_request_is_followed_into_detection_and_embedding(stack: LocalStack, face_photos: Path) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    gallery = gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))
    request = gallery_pb2.EnrollRequest(subject_id="traced", images=[(face_photos / "obama.jpg").read_bytes()])
    reply = gallery.Enroll(request, metadata=[("traceparent", f"00-{trace_id}-{parent}-01")], timeout=60)
    assert reply.templates_added == 1

    calls = {}
    for service, method in (
        ("matching", "GalleryService/Enroll"),
        ("detection", "DetectionService/Detect"),
        ("embedding", "EmbeddingService/Embed"),
    ):
        logged = wait_for_log(stack.log_path(service), trace_id)
        (call,) = [e for e in logged if e["msg"] == "rpc" and e["method"] == f"/sightline.v1.{method}"]
        assert call["code"] == "OK"
        calls[service] = call
    spans = {parent, *(call["span_id"] for call in calls.values())}
    assert len(spans) == 4, "each server runs the call in its own span"


# --- (d) an exporter ---------------------------------------------------------------------------------------------


def test_with_the_console_exporter_a_service_starts_serves_and_exports(
    stack: LocalStack, face_photos: Path, tmp_path: Path
) -> None:
    port, log_path = free_port(HOST), tmp_path / "capture.log"
    env = {
        **os.environ,
        "SIGHTLINE_TRACING_EXPORTER": "console",
        "SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "SIGHTLINE_CAPTURE_GRPC_HOST": HOST,
        "SIGHTLINE_CAPTURE_GRPC_PORT": str(port),
        "SIGHTLINE_CAPTURE_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        "SIGHTLINE_CAPTURE_ALLOWED_ROOTS": json.dumps([str(face_photos)]),
    }
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sightline.capture"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while check_health(f"{HOST}:{port}") != "SERVING":
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        final = ingest(
            str(face_photos / "obama.jpg"),
            source_id="console-camera",
            no_pacing=True,
            address=f"{HOST}:{port}",
            progress=False,
        )
        assert final.frames_published == 1
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()  # never leave a service behind; the assertion below then fails
            process.wait()
    assert process.returncode == 0, log_path.read_text()

    spans = [entry for entry in json_lines(log_path) if "context" in entry and "name" in entry]
    (frame,) = [span for span in spans if span["name"] == "capture"]
    assert frame["attributes"]["sightline.source_id"] == "console-camera" and frame["parent_id"] is None
    (call,) = [span for span in spans if span["name"] == "sightline.v1.CaptureService/Ingest"]
    assert [link["context"]["span_id"] for link in frame["links"]] == [call["context"]["span_id"]]
    assert len(json.dumps(frame)) < 4096, "a frame's span must not carry image data"
