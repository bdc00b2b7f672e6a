"""Generated and corrupted records on every stream topic of a running local stack, and a folder of hostile images
through capture: no service exits, no stage fails in a way it did not foresee, and every frame is accounted for.

What is published, from a fixed seed (``sightline.tooling.hostile``), with hostile record headers and keys:

- on the frames topic: FrameCaptured events with every field hostile (images broken, bombs, random; timestamps out of
  range; unknown purposes) and real photos with faces (so the rest of the path runs too), some corrupted on the wire;
- on faces, embeddings and matches: each topic's event with hostile fields, some corrupted, as a broken producer
  writing straight to the middle of the pipeline would;
- on sessions and erasures: hostile control events (they have no per-event output to follow; their stages must only
  survive them);
- through capture's Ingest: a folder of hostile image files.

Every record put on a stage topic and every frame capture read is followed to its outcome by
``sightline.tooling.frame_accounting``: a dead letter, decisions for all its faces, or "no face" (its match result
has no face: none found, or none worth a search, and decision published its NO_FACE decision). Nothing may stay
pending. An ``internal_error`` dead letter (an exception its stage did not foresee) fails the test.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fuzz_budget import FUZZ_INPUTS, FUZZ_SEED
from kafka import KafkaProducer

from sightline.common import codec, rpc
from sightline.common.bus import client_options, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.topics import EMBEDDINGS, ERASURES, FACES, FRAMES, MATCHES, SESSIONS, TopicSpec
from sightline.tooling.frame_accounting import DECIDED, NO_FACE, PENDING, WATCHED_TOPICS, FrameLedger
from sightline.tooling.frame_accounting import summary as outcome_summary
from sightline.tooling.hostile import HostileImages, corrupt, hostile_headers, hostile_message
from sightline.tooling.localstack import LocalStack
from sightline.v1 import capture_pb2, capture_pb2_grpc, events_pb2, types_pb2

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e]

DEFAULT_RECORDS = 200
# Where the records go: mostly frames (the pipeline's entry), the rest spread over the other consumed topics.
TOPIC_MIX: tuple[TopicSpec, ...] = (FRAMES,) * 8 + (FACES, EMBEDDINGS, MATCHES, SESSIONS, ERASURES)
FOLLOWED = {FRAMES.name, FACES.name, EMBEDDINGS.name, MATCHES.name}
FACE_SHARE = 0.2  # of frames: a real photo with faces and a sane frame reference
CORRUPT_SHARE = 0.2  # of records: damaged on the wire
INGESTED_FILES = 12  # hostile image files capture reads from a folder


@dataclass
class Run:
    """What one run published and how it ended."""

    ledger: FrameLedger = field(default_factory=FrameLedger)
    published: Counter[str] = field(default_factory=Counter)
    dropped_by_capture: int = 0
    seconds: float = 0.0


class RecordMaker:
    """The hostile records of a run, from its seed."""

    def __init__(self, seed: int, images: HostileImages, faces: tuple[bytes, ...]) -> None:
        self.rng = random.Random(seed)
        self.images, self.faces, self.seed = images, faces, seed

    def record(self, index: int) -> tuple[TopicSpec, bytes | None, bytes, str]:
        """(topic, key, value, kind) of the index-th record."""
        rng = self.rng
        topic = rng.choice(TOPIC_MIX)
        if topic is FRAMES and rng.random() < FACE_SHARE:
            message, kind = self._face_frame(index), "face"
        else:
            message, kind = hostile_message(codec.event_class(topic), rng, self.images), "hostile"
            if hasattr(message, "frame"):  # followed by frame id: one per record, whatever else is hostile
                message.frame.frame_id = f"hostile-{self.seed}-{index}"
            if topic is ERASURES:  # never a subject another record names: decision rightly withholds those results
                message.subject_id = f"erased-{self.seed}-{index}-{message.subject_id}"
        value = message.SerializeToString()
        if rng.random() < CORRUPT_SHARE:
            value, kind = corrupt(value, rng), "corrupt"
        key = rng.choice([None, b"", b"k", rng.randbytes(8)])
        return topic, key, value, kind

    def _face_frame(self, index: int) -> events_pb2.FrameCaptured:
        rng = self.rng
        frame = events_pb2.FrameCaptured(image=rng.choice(self.faces), media_type="image/jpeg")
        frame.frame.frame_id = f"hostile-{self.seed}-{index}"
        frame.frame.source_id = f"hostile-camera-{rng.randrange(3)}"
        frame.frame.sequence = index
        frame.frame.purpose = rng.choice([types_pb2.PURPOSE_CCTV, types_pb2.PURPOSE_ECHANNEL])
        frame.frame.captured_at.CopyFrom(codec.now())
        return frame


def publish(stack: LocalStack, kafka: KafkaSettings, maker: RecordMaker, count: int, run: Run) -> None:
    """Publish ``count`` records as a foreign producer would (no Sightline library: no CloudEvents headers) and follow
    those on stage topics."""
    producer = KafkaProducer(**client_options(kafka), acks="all", max_request_size=kafka.max_message_bytes)
    sent = []
    for index in range(count):
        topic, key, value, kind = maker.record(index)
        headers = hostile_headers(maker.rng)
        sent.append((topic, value, producer.send(topic.name, key=key, value=value, headers=headers)))
        run.published[f"{topic.name} {kind}"] += 1
    producer.flush()
    for topic, value, future in sent:
        metadata = future.get(timeout=60)
        if topic.name in FOLLOWED:
            run.ledger.follow(topic.name, metadata.partition, metadata.offset, value)
    producer.close()


def ingest_hostile_folder(stack: LocalStack, folder: Path, maker: RecordMaker, run: Run) -> None:
    """Capture reads a folder of hostile image files (the first a real photo, so a frame id names the run)."""
    folder.mkdir()
    (folder / "00.jpg").write_bytes(maker.faces[0])
    for index in range(1, INGESTED_FILES):
        suffix = maker.rng.choice(["jpg", "png", "gif", "tiff", "bmp", "webp"])
        (folder / f"{index:02d}.{suffix}").write_bytes(maker.images.image(maker.rng))
    source_id = f"hostile-folder-{maker.seed}"
    request = capture_pb2.IngestRequest(source_uri=str(folder), source_id=source_id, no_pacing=True)
    with rpc.channel(stack.addresses["capture"]) as channel:
        final = list(capture_pb2_grpc.CaptureServiceStub(channel).Ingest(request, timeout=120))[-1]
    assert final.done and final.frames_read == INGESTED_FILES and final.last_frame_id
    run_id = final.last_frame_id.rsplit(":", 2)[1]
    for sequence in range(1, INGESTED_FILES + 1):
        run.ledger.follow_capture_frame(f"{source_id}:{run_id}:{sequence}")
    run.published["capture files"] += INGESTED_FILES
    run.dropped_by_capture = final.frames_dropped


def wait_for_outcomes(kafka: KafkaSettings, run: Run, since_ms: int, timeout_s: float) -> None:
    """Read the topics back until no followed record is pending (but capture's dropped frames), or the timeout."""
    deadline = time.monotonic() + timeout_s
    checked = time.monotonic()

    def settled() -> bool:
        nonlocal checked
        now = time.monotonic()
        if now > deadline:
            return True
        if now - checked < 2.0:
            return False
        checked = now
        return _pending(run) <= run.dropped_by_capture

    # Also ends a minute after the last record: the pipeline has finished, whatever is still pending.
    for record in read_topics(kafka, WATCHED_TOPICS, since_ms, idle_timeout_s=60, stop=settled):
        run.ledger.consume(record.topic, record.partition, record.offset, record.value)


def _pending(run: Run) -> int:
    return sum(1 for outcome in run.ledger.outcomes() if outcome.kind == PENDING)


def hostile_run(
    stack: LocalStack, tmp_path: Path, images: HostileImages, faces: tuple[bytes, ...], count: int, timeout_s: float
) -> Run:
    started = time.monotonic()
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
    maker = RecordMaker(FUZZ_SEED + count, images, faces)
    run = Run()
    since_ms = int(time.time() * 1000) - 1000
    ingest_hostile_folder(stack, tmp_path / "source", maker, run)
    publish(stack, kafka, maker, count, run)
    wait_for_outcomes(kafka, run, since_ms, timeout_s)
    run.seconds = time.monotonic() - started
    return run


def check(stack: LocalStack, run: Run) -> Counter[str]:
    """Print what became of the run and assert the contract; returns the outcomes by kind."""
    outcomes = run.ledger.outcomes()
    summary = outcome_summary(outcomes)
    unforeseen = run.ledger.internal_errors
    print(f"\n{sum(run.published.values())} inputs in {run.seconds:.1f} s; followed {len(outcomes)}")
    for what, count in sorted(run.published.items()):
        print(f"  published {count:5d} {what}")
    for what, count in sorted(summary.items()):
        print(f"  outcome   {count:5d} {what}")
    for (stage, reason), count in sorted(run.ledger.dead_letter_reasons.items()):
        print(f"  dead letters {count:5d} {stage} {reason}")
    print(f"  outputs no followed record accounts for (replays): {run.ledger.duplicates()}")
    print(f"  capture dropped (backpressure, counted by Ingest): {run.dropped_by_capture}")
    assert stack.poll_crashed() == []
    assert not unforeseen, "\n".join(sorted(set(unforeseen))[:20])
    assert summary[PENDING] <= run.dropped_by_capture, f"{summary[PENDING]} records have no outcome"
    assert summary[DECIDED] > 0  # the real faces went all the way: the pipeline kept flowing through the hostile load
    refused = len(outcomes) - summary[DECIDED] - summary[NO_FACE] - summary[PENDING]
    assert refused > 0  # and the broken ones were dead-lettered
    return summary


def test_hostile_records_and_files_are_all_accounted_for(
    hostile_stack: LocalStack, tmp_path: Path, hostile_images: HostileImages, face_images: tuple[bytes, ...]
) -> None:
    run = hostile_run(hostile_stack, tmp_path, hostile_images, face_images, DEFAULT_RECORDS, timeout_s=180)
    check(hostile_stack, run)


@pytest.mark.slow
def test_thousands_of_hostile_inputs_through_the_pipeline_are_all_accounted_for(
    hostile_stack: LocalStack, tmp_path: Path, hostile_images: HostileImages, face_images: tuple[bytes, ...]
) -> None:
    run = hostile_run(hostile_stack, tmp_path, hostile_images, face_images, FUZZ_INPUTS, timeout_s=1800)
    check(hostile_stack, run)
