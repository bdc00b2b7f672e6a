"""A 1080p street camera through the real services: listed people walking past at 48-80 px face width raise one
alert per (track, listed subject), and nobody else raises any.

The "camera" is synthetic video (sightline.tooling.walkers): real faces of the sample photos crossing a fixed
face-free background at 5 frames per second, growing as they come closer, with sensor noise on every frame, scanned
by the detection service with its default CCTV settings (40 px smallest face, focused scanning). Obama, enrolled on
the watchlist from another photo, walks past twice with a pause longer than a track lives (two tracks, two alerts);
Biden, enrolled but on no watchlist, and a stranger from dlib's photos, enrolled nowhere, walk past too. The
decision policy has no alert cool-down here, so that each track's alert shows (by default a second alert for the same
subject on the same camera within 60 s is merged into the first).
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import pytest

from sightline.cli.gallery import enroll
from sightline.cli.outcomes import collect
from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.topics import FRAMES
from sightline.detection.settings import DetectionSettings
from sightline.tooling.localstack import LocalStack
from sightline.tooling.scenes import FaceLibrary
from sightline.tooling.walkers import Walker, faces_of, video
from sightline.v1 import events_pb2, types_pb2

pytestmark = pytest.mark.e2e
SOURCE = "street-cam"
WATCHLIST = "wanted"
FPS = 5.0
VIDEO_FRAMES = 34
# Without a cool-down, so that each track's alert shows; the default (60 s) merges Obama's second walk, on the same
# camera seconds later, into the first alert (decision/engine.py).
POLICY = """\
version: "walkers-test"
alert_cooldown_seconds: 0
"""


def walkers(library: FaceLibrary) -> list[Walker]:
    stranger = next(face for face in library.faces if face.photo.startswith("20"))  # one of dlib's VOC photos
    obama3 = faces_of(library, "obama3.jpg")[0]
    gap = int(DetectionSettings().track_max_age_s * FPS) + 3  # frames between Obama's two walks: a new track
    return [
        Walker("obama-1", faces_of(library, "obama.jpg")[0], 0, 11, (250, 420), (1100, 470), (48, 80)),
        Walker("biden", faces_of(library, "biden.jpg")[0], 2, 15, (1750, 300), (900, 330), (50, 72)),
        Walker("stranger", stranger, 6, 19, (300, 800), (1300, 760), (48, 70)),
        Walker("obama-2", obama3, 11 + gap, VIDEO_FRAMES - 1, (1650, 700), (800, 650), (52, 80)),
    ]


def publish(kafka: KafkaSettings, library: FaceLibrary) -> tuple[set[int], dict[int, list[str]]]:
    """The camera's frames on the frames topic; their sequences and who is in view in each."""
    producer = make_producer(kafka)
    started = time.time()
    in_view: dict[int, list[str]] = {}
    for frame in video(library, walkers(library), VIDEO_FRAMES, background=0):
        sequence = frame.index + 1
        in_view[sequence] = [label for label, _ in frame.faces]
        ref = types_pb2.FrameRef(
            frame_id=f"{SOURCE}:walk:{sequence}", source_id=SOURCE, sequence=sequence, purpose=types_pb2.PURPOSE_CCTV
        )
        ref.captured_at.FromNanoseconds(int((started + frame.index / FPS) * 1e9))
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        event = events_pb2.FrameCaptured(frame=ref, image=jpeg.tobytes(), media_type="image/jpeg")
        producer.send(FRAMES.name, key=SOURCE.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()
    return set(in_view), in_view


def test_listed_walkers_raise_one_alert_per_track_and_nobody_else_any(
    tmp_path: Path, face_photos: Path, models_dir: Path
) -> None:
    library = FaceLibrary()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    services = ("detection", "embedding", "matching", "decision")
    with LocalStack(tmp_path / "run", ports="auto", services=services, policy_file=policy) as stack:
        stack.start(timeout=120)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
        matching = stack.addresses["matching"]
        assert enroll("obama", [face_photos / "obama2.jpg"], [WATCHLIST], address=matching) == 1  # another photo
        assert enroll("biden", [face_photos / "biden.jpg"], [], address=matching) == 1
        since = int(time.time() * 1000) - 1000
        sequences, in_view = publish(kafka, library)
        outcomes = collect(kafka, SOURCE, sequences, since, timeout_s=240, grace_s=3.0)
        assert stack.poll_crashed() == []

    assert outcomes.done(sequences), "every frame reached a decision"
    obama_frames = {s for s, labels in in_view.items() if any(label.startswith("obama") for label in labels)}
    alerts = [(alert.subject_id, alert.track_id) for alert in outcomes.alerts]
    decided = [(d.frame.sequence, d.track_id, d.subject_id, d.outcome) for d in outcomes.decisions]
    assert {subject for subject, _ in alerts} == {"obama"}, (alerts, decided)
    assert len(alerts) == 2 and len({track for _, track in alerts}) == 2, alerts  # one per walk: two tracks
    assert all(track.startswith(f"{SOURCE}/t") for _, track in alerts)
    evidence = {int(frame_id.rsplit(":", 1)[1]) for alert in outcomes.alerts for frame_id in alert.evidence_frame_ids}
    assert evidence and evidence <= obama_frames, (evidence, obama_frames)
    assert all(list(alert.watchlists) == [WATCHLIST] for alert in outcomes.alerts)
