"""Capture's backpressure against the real broker: CCTV frames are dropped, and counted, while the detection group
lags, never e-channel frames; nothing is dropped while the lag is within the limit; a dead broker cannot grow the
producer's buffer.

The lag is the real one (common/lag.py): records are added to the frames topic that the detection consumer group has
not consumed, as when a stalled detection stage leaves its committed offsets far behind. The group's offsets are not
committed here: the session's broker is shared, and other tests read that group's commits; records added after
whatever it committed (or, if it committed nothing, anything on the topic) count as lag either way.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from sightline.capture.backpressure import LAGGING, PRODUCER_FULL, BrokerUnavailable, ConsumerLag, frames_lag
from sightline.capture.service import Capture
from sightline.capture.settings import CaptureSettings
from sightline.common.bus import ensure_topics, make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.lag import consumer_group, group_lags
from sightline.common.topics import FRAMES
from sightline.tooling.broker import LocalBroker
from sightline.v1 import capture_pb2, types_pb2

DETECTION = consumer_group("detection")
MAX_LAG = 20
FILLER = 60


def detection_lag(kafka: KafkaSettings) -> int:
    lag = group_lags(kafka, [(DETECTION, FRAMES.name)])[(DETECTION, FRAMES.name)]
    assert lag.error is None, lag.error
    return lag.total


@pytest.fixture()
def lagging_detection(kafka: KafkaSettings) -> int:
    """FILLER more records on the frames topic that the detection group has not consumed; its lag."""
    producer = make_producer(kafka)
    for i in range(FILLER):
        producer.send(FRAMES.name, key=b"filler", value=b"not a frame", partition=i % 4)
    producer.flush()
    producer.close()
    lag = detection_lag(kafka)
    assert lag >= FILLER > MAX_LAG
    return lag


@pytest.fixture()
def photos(tmp_path: Path, face_photos: Path) -> Path:
    folder = tmp_path / "camera"
    folder.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg"):
        shutil.copy(face_photos / name, folder / name)
    for i in range(3):
        shutil.copy(face_photos / "obama2.jpg", folder / f"walk-{i}.jpg")
    return folder


@contextmanager
def opened_capture(kafka: KafkaSettings, **settings: Any) -> Iterator[Capture]:
    settings.setdefault("allowed_roots", [Path(tempfile.gettempdir()).resolve()])  # where the photos fixture is
    capture = Capture(CaptureSettings(backpressure_refresh_s=0.1, **settings), kafka)
    try:
        yield capture
    finally:
        capture.backpressure.close()
        capture.producer.close(5)


@pytest.fixture()
def capture(kafka: KafkaSettings) -> Iterator[Capture]:
    with opened_capture(kafka, backpressure_max_lag_frames=MAX_LAG) as opened:
        yield opened


def ingest(capture: Capture, folder: Path, source_id: str, purpose: int) -> capture_pb2.IngestResponse:
    request = capture_pb2.IngestRequest(source_uri=str(folder), source_id=source_id, purpose=purpose, no_pacing=True)
    return list(capture.ingest(request))[-1]


def frames_on_topic(kafka: KafkaSettings, source_id: str) -> int:
    return sum(1 for r in read_topics(kafka, [FRAMES.name], idle_timeout_s=1.0) if r.key == source_id.encode())


def dropped_metric(source_id: str, reason: str) -> float:
    labels = {"service": "capture", "source": source_id, "reason": reason}
    return REGISTRY.get_sample_value("sightline_frames_dropped_total", labels) or 0.0


def test_cctv_frames_are_dropped_and_counted_while_detection_lags(
    kafka: KafkaSettings, lagging_detection: int, capture: Capture, photos: Path
) -> None:
    final = ingest(capture, photos, "lagging-cam", types_pb2.PURPOSE_CCTV)
    assert final.done and final.frames_read == 8 and final.frames_failed == 0
    assert final.frames_dropped > 0
    assert final.frames_published + final.frames_dropped == final.frames_read
    assert dropped_metric("lagging-cam", LAGGING) == final.frames_dropped
    assert frames_on_topic(kafka, "lagging-cam") == final.frames_published  # dropped frames never reached the topic


def test_echannel_frames_are_never_dropped(
    kafka: KafkaSettings, lagging_detection: int, capture: Capture, photos: Path
) -> None:
    final = ingest(capture, photos, "gate-1", types_pb2.PURPOSE_ECHANNEL)
    assert final.frames_dropped == 0 and final.frames_published == final.frames_read == 8
    assert detection_lag(kafka) > MAX_LAG  # the consumers did lag
    assert frames_on_topic(kafka, "gate-1") == 8


def test_nothing_is_dropped_while_the_lag_is_within_the_limit(kafka: KafkaSettings, photos: Path) -> None:
    with opened_capture(kafka, backpressure_max_lag_frames=detection_lag(kafka) + 50) as capture:
        final = ingest(capture, photos, "calm-cam", types_pb2.PURPOSE_CCTV)
    assert final.frames_dropped == 0 and final.frames_published == final.frames_read == 8
    assert frames_on_topic(kafka, "calm-cam") == 8


def test_the_lag_is_measured_in_the_background_not_per_frame(kafka: KafkaSettings, lagging_detection: int) -> None:
    measurements: list[float] = []

    def measure() -> int | None:
        measurements.append(time.monotonic())
        return frames_lag(kafka)

    lag = ConsumerLag(measure, refresh_s=0.2)
    try:
        started = time.monotonic()
        figures = []
        while time.monotonic() - started < 1.0:  # a capture loop reading the figure for every frame
            figures.append(lag.current())
        idle = len(measurements)
        time.sleep(0.6)  # nobody reads it: no measurement
    finally:
        lag.close()
    assert len(figures) > 1000 and figures[0] is not None and min(f for f in figures if f is not None) >= FILLER
    assert 2 <= idle <= 7, measurements  # about one per refresh_s over the second, not one per frame
    assert len(measurements) <= idle + 1
    gaps = [b - a for a, b in pairwise(measurements)]
    assert min(gaps) >= 0.2


def test_a_dead_broker_cannot_grow_the_producers_buffer(tmp_path: Path, photos: Path) -> None:
    broker = LocalBroker()
    broker.start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(kafka, [FRAMES])
    limit = 1024 * 1024
    settings = CaptureSettings(
        publish_buffer_bytes=limit,
        publish_timeout_s=0.5,
        backpressure_refresh_s=0.1,
        allowed_roots=[tmp_path.resolve()],
    )
    capture = Capture(settings, kafka)
    try:
        one = tmp_path / "one"
        one.mkdir()
        shutil.copy(photos / "obama2.jpg", one / "first.jpg")
        assert ingest(capture, one, "cam", types_pb2.PURPOSE_CCTV).frames_published == 1  # the producer knows the topic
        broker.stop()

        final = ingest(capture, photos, "cam", types_pb2.PURPOSE_CCTV)
        assert final.frames_published + final.frames_dropped == final.frames_read == 8
        assert final.frames_dropped > 0 and dropped_metric("cam", PRODUCER_FULL) == final.frames_dropped
        largest_frame = max(p.stat().st_size for p in photos.iterdir())
        assert capture.backpressure.in_flight.bytes <= limit + largest_frame  # held, unacknowledged, but bounded

        with pytest.raises(BrokerUnavailable, match="buffer stayed full"):
            ingest(capture, one, "gate-1", types_pb2.PURPOSE_ECHANNEL)  # never dropped: it fails instead

        broker.start()  # back (empty): the held frames are delivered and the buffer empties
        deadline = time.monotonic() + 60
        while capture.backpressure.in_flight.bytes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert capture.backpressure.in_flight.bytes == 0
        assert ingest(capture, one, "gate-1", types_pb2.PURPOSE_ECHANNEL).frames_published == 1
    finally:
        capture.backpressure.close()
        capture.producer.close(5)
        broker.stop()
